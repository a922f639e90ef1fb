"""Model.log: ART's parquet layout, history.jsonl rules, computed metrics, concurrency, bad input."""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import threading
import warnings
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from core_support import make_groups, make_trajectory, read_lines

import art_core as art
from art_core.history import read_history
from art_core.trajectory_parquet import SCHEMA_VERSION_KEY, read_trajectory_groups

ART_COLUMNS = [
    "group_index",
    "group_metadata",
    "group_metrics",
    "group_logs",
    "reward",
    "metrics",
    "metadata",
    "tools",
    "logs",
    "messages",
]


def model(base_path: str, name: str = "agent-001") -> art.Model:
    return art.Model(name=name, project="proj", base_path=base_path, report_metrics=[])


async def test_parquet_has_arts_columns_zstd_and_schema_version(base_path: str) -> None:
    m = model(base_path)
    groups = make_groups([[0.0, 1.0], [1.0, 1.0, 0.5]])
    groups[0].metadata["scenario_id"] = "s-1"
    groups[1].trajectories[0].tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    await m.log(groups, step=3)
    path = m.output_dir() / "trajectories" / "train" / "0003.parquet"
    table = pq.read_table(path)
    assert table.column_names == ART_COLUMNS
    assert table.schema.metadata[SCHEMA_VERSION_KEY] == b"1"
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    assert table.column("reward").to_pylist() == [0.0, 1.0, 1.0, 1.0, 0.5]
    first = table.column("messages").to_pylist()[0]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert [m["trainable"] for m in first] == [False, False, True]
    frame = pl.read_parquet(path)
    assert frame.columns == ART_COLUMNS
    assert frame["group_index"].to_list() == [0, 0, 1, 1, 1]
    assert json.loads(frame["group_metadata"][0]) == {"scenario_id": "s-1"}
    assert json.loads(frame["tools"][2])[0]["function"]["name"] == "f"
    assert frame["messages"][0][2]["content"] == "acd"
    back = read_trajectory_groups(path)
    assert [[t.reward for t in g] for g in back] == [[0.0, 1.0], [1.0, 1.0, 0.5]]


async def test_empty_batch_writes_a_zero_row_file_with_the_schema(base_path: str) -> None:
    m = model(base_path)
    await m.log([], step=0, split="val")
    table = pq.read_table(m.output_dir() / "trajectories" / "val" / "0000.parquet")
    assert table.num_rows == 0 and table.column_names == ART_COLUMNS
    assert pl.read_parquet(m.output_dir() / "trajectories" / "val" / "0000.parquet").shape == (0, 10)


async def test_no_temp_files_are_left_behind(base_path: str) -> None:
    m = model(base_path)
    await m.log(make_groups([[0.0, 1.0]]), step=1)
    assert sorted(p.name for p in (m.output_dir() / "trajectories" / "train").iterdir()) == ["0001.parquet"]


async def test_history_prefix_rules_and_computed_metrics(base_path: str) -> None:
    m = model(base_path)
    groups = [
        art.TrajectoryGroup(
            [make_trajectory(0.0, turns=2), make_trajectory(1.0, turns=4), RuntimeError("x")],
            metrics={"hard": 1},
        ),
        art.TrajectoryGroup([make_trajectory(1.0, turns=1), make_trajectory(1.0, turns=1)]),
    ]
    await m.log(groups, step=2, metrics={"loss/train": 0.25, "custom": 7, "train/reward": 0.9})
    (record,) = read_lines(m.output_dir() / "history.jsonl")
    assert record["step"] == 2 and "recorded_at" in record
    assert record["loss/train"] == 0.25  # a section key stays as it is
    assert record["train/custom"] == 7  # others get the split
    assert record["train/reward"] == 0.9  # caller metrics win over computed ones
    assert record["train/reward_std_dev"] == pytest.approx(0.25)  # mean of 0.5 and 0.0 (population std)
    assert record["train/exception_rate"] == pytest.approx(1 / 5)
    assert record["train/turns"] == pytest.approx(2.0)
    assert record["train/group_hard"] == 1
    assert record["data/step_num_groups_submitted"] == 2
    assert record["data/step_num_groups_trainable"] == 1
    assert record["data/step_num_trajectories"] == 5


async def test_val_split_and_custom_splits(base_path: str) -> None:
    m = model(base_path)
    await m.log(make_groups([[0.0, 1.0]]), split="val", step=1)
    await m.log(metrics={"loss/x": 1.0}, split="eval-hard", step=1)
    val, custom = read_lines(m.output_dir() / "history.jsonl")
    assert val["val/reward"] == 0.5 and "data/step_num_groups_trainable" not in val
    assert custom == {"eval-hard/loss/x": 1.0, "step": 1, "recorded_at": custom["recorded_at"]}


async def test_nan_and_infinity_never_reach_the_file(base_path: str) -> None:
    m = model(base_path)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        await m.log(metrics={"a": math.nan, "b": math.inf, "c": 1.0}, step=1)
    text = (m.output_dir() / "history.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["train/c"] == 1.0


async def test_key_first_seen_on_line_150_is_not_lost(base_path: str) -> None:
    m = model(base_path)
    for step in range(200):
        metrics = {"loss/train": 1.0 / (step + 1)}
        if step >= 149:
            metrics["late"] = float(step)
        await m.log(metrics=metrics, step=step)
    path = m.output_dir() / "history.jsonl"
    ours = read_history(path)
    assert ours[149]["train/late"] == 149.0 and "train/late" not in ours[148]
    frame = pl.read_ndjson(path, infer_schema_length=None)
    assert frame["train/late"].drop_nulls().to_list()[0] == 149.0
    # polars' default infers the schema from the first 100 lines only: that is why we read with our reader
    assert "train/late" not in pl.read_ndjson(path).columns


def _log_in_process(base_path: str, worker: int, steps: int) -> None:
    m = model(base_path)
    for step in range(steps):
        asyncio.run(
            m.log(metrics={f"w{worker}": float(step), "payload": float(worker) * 1e6 + step}, step=step)
        )


async def test_concurrent_logs_from_threads_and_processes_keep_every_line(base_path: str) -> None:
    m = model(base_path)
    await asyncio.gather(*(m.log(metrics={"thread": float(i), "x" * 200: 1.0}, step=i) for i in range(8)))
    threads = [threading.Thread(target=_log_in_process, args=(base_path, 100 + i, 5)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_log_in_process, args=(base_path, i, 5)) for i in range(8)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    lines = (m.output_dir() / "history.jsonl").read_text().splitlines()
    assert len(lines) == 8 + 8 * 5 + 8 * 5
    records = [json.loads(line) for line in lines]  # every line intact and parseable
    for worker in [*range(8), *range(100, 108)]:
        assert sorted(r[f"train/w{worker}"] for r in records if f"train/w{worker}" in r) == [0, 1, 2, 3, 4]


async def test_corrupt_history_line_is_skipped_with_a_warning(base_path: str) -> None:
    m = model(base_path)
    await m.log(metrics={"a": 1.0}, step=1)
    with open(m.output_dir() / "history.jsonl", "a") as handle:
        handle.write('{"step": 2, "train/a": \n')
    await m.log(metrics={"a": 3.0}, step=3)
    with pytest.warns(RuntimeWarning, match="not valid JSON"):
        records = m.read_history()
    assert [r["step"] for r in records] == [1, 3]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ("hello", "not str"),
        (42, "not int"),
        ([{"trajectories": []}], r"\[0\] is a dict"),
    ],
)
async def test_wrong_types_are_type_errors_naming_what_was_passed(
    base_path: str, groups: object, message: str
) -> None:
    m = model(base_path)
    with pytest.raises(TypeError, match=message):
        await m.log(groups, step=1)  # type: ignore[arg-type]
    assert not Path(base_path).exists()


async def test_bad_metrics_split_and_step(base_path: str) -> None:
    m = model(base_path)
    with pytest.raises(TypeError, match="metric 'a' is a str"):
        await m.log(metrics={"a": "high"}, step=1)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="dict of name"):
        await m.log(metrics=[1.0], step=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a plain name"):
        await m.log(metrics={"a": 1.0}, split="../escape", step=1)
    with pytest.raises(ValueError, match="negative"):
        await m.log(metrics={"a": 1.0}, step=-1)
    with pytest.raises(ValueError, match="trajectory 1 in group 0 is nan"):
        groups = make_groups([[0.0, 1.0]])
        groups[0].trajectories[1].reward = math.nan
        await m.log(groups, step=1)
    assert not Path(base_path).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_unwritable_base_path_is_a_clear_oserror_before_writing(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    m = model(str(locked / "art"))
    with pytest.raises(OSError, match="writable base_path"):
        await m.log(make_groups([[0.0, 1.0]]), step=1)
    assert list(locked.iterdir()) == []


async def test_base_path_under_a_file_is_a_clear_oserror_before_writing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    m = model(str(blocker / "art"))
    with pytest.raises(OSError, match="writable base_path"):
        await m.log(make_groups([[0.0, 1.0]]), step=1)
    assert blocker.read_text() == "x"


async def test_history_that_is_not_writable_fails_before_parquet_is_written(
    base_path: str, tmp_path: Path
) -> None:
    m = model(base_path)
    m.output_dir().mkdir(parents=True)
    (m.output_dir() / "history.jsonl").mkdir()  # a directory where the file should be: unwritable as a file
    with pytest.raises(OSError):
        await m.log(make_groups([[0.0, 1.0]]), step=1)
    assert not (m.output_dir() / "trajectories").exists()


async def test_flat_trajectory_list_is_one_group(base_path: str) -> None:
    m = model(base_path)
    await m.log([make_trajectory(1.0), make_trajectory(0.0)], step=1)  # type: ignore[list-item]
    assert read_lines(m.output_dir() / "history.jsonl")[0]["data/step_num_groups_submitted"] == 1


async def test_log_with_nothing_warns_and_writes_nothing(base_path: str) -> None:
    m = model(base_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await m.log(step=1)
    assert "nothing to log" in str(caught[0].message)
    assert not Path(base_path).exists()

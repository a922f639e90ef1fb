"""Model.log of a split and step that already has a file appends; a killed log() leaves no temp file behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from core_support import make_groups, read_lines

import art_core as art
from art_core.trajectory_parquet import read_trajectory_groups


def model(base_path: str) -> art.Model:
    return art.Model(name="agent-001", project="proj", base_path=base_path, report_metrics=[])


def step_file(m: art.Model, split: str, step: int) -> Path:
    return m.output_dir() / "trajectories" / split / f"{step:04d}.parquet"


async def test_logging_a_step_twice_appends_groups_after_the_first(base_path: str) -> None:
    m = model(base_path)
    await m.log(make_groups([[0.0, 1.0], [0.5]]), split="val", step=4)
    await m.log(make_groups([[0.25, 0.75, 1.0]]), split="val", step=4)
    path = step_file(m, "val", 4)
    table = pq.read_table(path)
    assert table.column("reward").to_pylist() == [0.0, 1.0, 0.5, 0.25, 0.75, 1.0]
    assert table.column("group_index").to_pylist() == [0, 0, 1, 2, 2, 2]
    assert pl.read_parquet(path)["group_index"].unique().sort().to_list() == [0, 1, 2]
    assert [len(group) for group in read_trajectory_groups(path)] == [2, 1, 3]
    lines = read_lines(m.output_dir() / "history.jsonl")
    assert [line["step"] for line in lines] == [4, 4]
    assert [line["val/reward"] for line in lines] == [0.5, pytest.approx(2.0 / 3.0)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["0004.parquet"]


async def test_train_and_val_of_one_step_stay_apart(base_path: str) -> None:
    m = model(base_path)
    await m.log(make_groups([[1.0, 0.0]]), split="train", step=2)
    await m.log(make_groups([[0.5]]), split="val", step=2)
    assert pq.read_table(step_file(m, "train", 2)).column("reward").to_pylist() == [1.0, 0.0]
    assert pq.read_table(step_file(m, "val", 2)).column("reward").to_pylist() == [0.5]


async def test_concurrent_logs_of_one_step_keep_every_row(base_path: str) -> None:
    m = model(base_path)
    await asyncio.gather(*(m.log(make_groups([[float(i)] * 3]), split="val", step=7) for i in range(8)))
    table = pq.read_table(step_file(m, "val", 7))
    assert sorted(table.column("reward").to_pylist()) == sorted(float(i) for i in range(8) for _ in range(3))
    assert sorted(set(table.column("group_index").to_pylist())) == list(range(8))


async def test_a_foreign_file_at_the_step_is_refused_and_left_as_it_was(base_path: str) -> None:
    m = model(base_path)
    await m.log(make_groups([[1.0]]), step=0)  # creates the directories and the history
    path = step_file(m, "train", 5)
    path.write_bytes(b"not a parquet file")
    history = m.output_dir() / "history.jsonl"
    lines_before = history.read_bytes()
    with pytest.raises(ValueError, match=r"cannot append to .*0005\.parquet.*move it away"):
        await m.log(make_groups([[0.5]]), step=5)
    assert path.read_bytes() == b"not a parquet file"
    assert history.read_bytes() == lines_before
    assert not list(path.parent.glob(".*.tmp"))


CHILD = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from core_support import make_groups
    import art_core as art

    model = art.Model(name="agent-001", project="proj", base_path=sys.argv[1], report_metrics=[])
    real_fsync = os.fsync

    def fsync_then_stall(fd):
        # the temp parquet exists and is being made durable: stall here, as a process killed mid-write would
        if list((model.output_dir() / "trajectories" / "train").glob(".*.tmp")):
            print("STALLED", flush=True)
            time.sleep(600)
        real_fsync(fd)

    asyncio.run(model.log(make_groups([[1.0, 0.0]]), step=1))
    os.fsync = fsync_then_stall
    asyncio.run(model.log(make_groups([[0.5, 0.5]]), step=2))
    """
)


async def test_temp_files_of_a_killed_log_are_removed_by_the_next_log(base_path: str) -> None:
    tests_dir = str(Path(__file__).resolve().parent)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, base_path, tests_dir], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and "STALLED" not in line:
            line = child.stdout.readline()
            if not line and child.poll() is not None:
                break
        assert "STALLED" in line, f"the child exited with {child.poll()} before stalling"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    m = model(base_path)
    directory = m.output_dir() / "trajectories" / "train"
    assert len(list(directory.glob(".*.tmp"))) == 1, "the killed write left no temp file to clean"
    assert not step_file(m, "train", 2).exists()

    await m.log(make_groups([[0.25]]), split="val", step=3)  # another split: the sweep covers every split
    assert not list(directory.glob(".*.tmp"))
    assert pq.read_table(step_file(m, "train", 1)).column("reward").to_pylist() == [1.0, 0.0]
    await m.log(make_groups([[0.75]]), step=2)
    assert pq.read_table(step_file(m, "train", 2)).column("reward").to_pylist() == [0.75]

"""The built-in wandb reporter, with real wandb in offline mode, read back from the run file."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import art_core as art
from art_core import plugins

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + version; each record: crc32 (4), length (2), type (1)


def wandb_records(run_file: Path) -> tuple[list[dict[str, Any]], list[str | None]]:
    """History items and record kinds of an offline run: a LevelDB-style log of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records: list[bytes] = []
    pending = b""
    position = HEADER
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    items = []
    kinds = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kinds.append(record.WhichOneof("record_type"))
        if record.WhichOneof("record_type") == "history":
            items.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return items, kinds


def wandb_history(run_file: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """History items, once wandb's asynchronous writer has flushed the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        items, kinds = wandb_records(run_file)
        if "exit" in kinds or time.monotonic() > deadline:
            return items
        time.sleep(0.2)


@pytest.fixture
def offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("ART_LOAD_PLUGINS", "")
    plugins.reset_plugin_manager()
    yield tmp_path / "wandb-dir"
    plugins.reset_plugin_manager()


async def test_offline_wandb_run_receives_the_history_records(offline_wandb: Path, base_path: str) -> None:
    model = art.Model(
        name="wandb-agent", project="demo", base_path=base_path
    )  # report_metrics=None + WANDB_MODE
    await model.log(metrics={"reward": 0.25, "loss/train": 1.5}, step=1)
    await model.log(metrics={"reward": 0.75}, split="val", step=2)
    model.close_reporters()
    (run_file,) = offline_wandb.glob("wandb/offline-run-*/run-wandb-agent.wandb")
    history = wandb_history(run_file)
    assert [(h["training_step"], h.get("train/reward"), h.get("val/reward")) for h in history] == [
        (1, 0.25, None),
        (2, None, 0.75),
    ]
    assert history[0]["loss/train"] == 1.5
    local = model.read_history()
    assert [r["step"] for r in local] == [1, 2]  # the same records also went to history.jsonl

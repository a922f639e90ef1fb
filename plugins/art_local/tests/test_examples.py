"""The examples run as a user runs them (subprocesses), in shortened form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: a second thread only waits on a busy machine
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


def _history(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(400)
def test_quickstart_smoke_run(tmp_path: Path) -> None:
    stdout = _run("quickstart.py", "--steps", "3", "--output", str(tmp_path), cwd=tmp_path)
    model_dir = tmp_path / "sort" / "models" / "quickstart"
    records = _history(model_dir / "history.jsonl")
    assert [r["step"] for r in records if "loss/sft" in r] == [1]  # the SFT warm start is step 1
    assert [r["step"] for r in records if "train/reward" in r] == [2, 3]
    assert [r["step"] for r in records if "val/reward" in r] == [3]
    assert "step 3: val/reward" in stdout and "history:" in stdout
    again = _run("quickstart.py", "--steps", "4", "--output", str(tmp_path), cwd=tmp_path)  # resumes at 3
    assert [r["step"] for r in _history(model_dir / "history.jsonl") if "train/reward" in r] == [2, 3, 4]
    assert "step 4: val/reward" in again


@pytest.mark.timeout(400)
def test_tool_use_smoke_run_calls_the_tool_over_several_turns(tmp_path: Path) -> None:
    stdout = _run(
        "tool_use.py", "--steps", "2", "--warm-start-steps", "100", "--output", str(tmp_path), cwd=tmp_path
    )
    assert "step 1: SFT loss" in stdout and "step 2: reward" in stdout and "step 3: reward" in stdout
    model_dir = tmp_path / "tool-use" / "models" / "weather"
    assert [r["step"] for r in _history(model_dir / "history.jsonl") if "train/reward" in r] == [2, 3]
    rows = pq.read_table(model_dir / "trajectories" / "train" / "0003.parquet").to_pylist()
    episodes = [json.loads(r["messages"]) if isinstance(r["messages"], str) else r["messages"] for r in rows]
    with_tool = [e for e in episodes if any(m["role"] == "tool" for m in e)]
    assert with_tool, "after the format warm start the model should call get_weather"
    episode = with_tool[0]
    roles = [m["role"] for m in episode]
    assert roles[:3] == ["user", "assistant", "tool"]  # a call, the tool's reply, then the model again
    call = (
        json.loads(episode[1]["tool_calls"])
        if isinstance(episode[1]["tool_calls"], str)
        else episode[1]["tool_calls"]
    )
    assert call[0]["function"]["name"] == "get_weather" and episode[2]["tool_call_id"] == call[0]["id"]
    assert "degrees in" in episode[2]["content"] or episode[2]["content"].startswith("error:")
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows) and any(r["reward"] >= 0.2 for r in rows)

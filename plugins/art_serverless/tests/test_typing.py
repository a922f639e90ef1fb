"""Static typing: ServerlessBackend matches art_core.TrainableBackend for mypy, and an option it lacks is an error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SNIPPET = """
import art_core as art
from art_serverless import ServerlessBackend


async def step(model: art.TrainableModel, groups: list[art.TrajectoryGroup]) -> None:
    backend = ServerlessBackend("key")
    common: art.TrainableBackend = backend  # structural match, checked by mypy
    await common.train(model, groups, learning_rate=1e-5)
    result: art.ServerlessTrainResult = await backend.train(model, groups, kimi_k2_tau=0.1, verbose=True)
    await backend.train(model, groups, plot_tensors=True)  # line 11: not a Serverless option
"""


# openai's and tqdm's types play no part in these signatures; skipping them makes the cold run ~3x faster
CONFIG = """
[mypy]
strict = True
[mypy-openai.*,tqdm.*]
follow_imports = skip
ignore_missing_imports = True
"""


def test_mypy_accepts_the_protocol_and_rejects_plot_tensors(tmp_path: Path) -> None:
    source = tmp_path / "snippet.py"
    source.write_text(textwrap.dedent(SNIPPET))
    config = tmp_path / "mypy.ini"
    config.write_text(CONFIG)
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--no-error-summary",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--config-file",
        str(config),
        str(source),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, done.stdout + done.stderr
    assert "snippet.py:11:" in errors[0] and 'Unexpected keyword argument "plot_tensors"' in errors[0]

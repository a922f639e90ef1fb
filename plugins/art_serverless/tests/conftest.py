"""Fixtures: the real server app with the toy backend on a real loopback uvicorn, and helpers around it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverless_harness import Served, serve_toy


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve_toy(tmp_path / "server") as handle:
        yield handle

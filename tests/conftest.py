"""Fixtures for art-core tests (helpers live in core_support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from core_support import MemoryBackend


@pytest.fixture
def memory_backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def base_path(tmp_path: Path) -> str:
    return str(tmp_path / "art")


@pytest.fixture(autouse=True)
def _no_wandb_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)

"""Fixtures: one loopback server subprocess for the session, the tiny model, and TinkerBackends pointed at it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tinker_harness import Server, loopback_server


@pytest.fixture(scope="session", autouse=True)
def _no_telemetry() -> Iterator[None]:
    saved = os.environ.get("TINKER_TELEMETRY")
    os.environ["TINKER_TELEMETRY"] = "0"
    yield
    if saved is None:
        os.environ.pop("TINKER_TELEMETRY", None)
    else:
        os.environ["TINKER_TELEMETRY"] = saved


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from art_local.tiny import build_tiny_model

    return str(build_tiny_model("tiny"))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with loopback_server(tmp_path_factory.mktemp("tinker-server")) as running:
        yield running

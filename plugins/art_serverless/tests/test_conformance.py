"""art_core's conformance kit run on ServerlessBackend, against the server on loopback with the real local
backend and the tiny model (one server for the module; every test gets a fresh client and fresh models)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serverless_harness import API_KEY, ThreadServer

from art_core.testing import BackendConformance
from art_serverless import ServerlessBackend
from art_serverless.server import ServerConfig, create_app

pytest.importorskip("art_local.backend")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("serverless-conformance")
    with ThreadServer(
        create_app(ServerConfig(data_dir=data_dir, api_key=API_KEY, backend="local"))
    ) as server:
        yield server.url


class TestServerlessBackendConformance(BackendConformance):
    supports_inference = True
    supports_delete = True
    supports_resume = True  # state lives on the server: a new client instance sees the same steps
    supports_sft = True

    @pytest.fixture
    def backend(self, local_server: str) -> ServerlessBackend:
        return ServerlessBackend(API_KEY, local_server, poll_interval=0.1, progress=False)

    @pytest.fixture
    def base_model(self) -> str:
        from art_local.tiny import build_tiny_model

        return str(build_tiny_model("tiny"))

    @pytest.fixture
    def fresh_backend(self, local_server: str) -> Callable[[], Any]:
        return lambda: ServerlessBackend(API_KEY, local_server, poll_interval=0.1, progress=False)


def test_the_kit_saw_a_real_backend(tmp_path: Path) -> None:
    """Guard: the class above must not silently degrade into skips (every capability is claimed)."""
    suite = TestServerlessBackendConformance
    assert suite.supports_inference and suite.supports_delete and suite.supports_resume
    assert suite.deliberately_overridden == {}

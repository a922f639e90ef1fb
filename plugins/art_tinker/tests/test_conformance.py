"""art_core's conformance kit, run on TinkerBackend against the loopback server."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tinker_harness import Server

from art_core.testing import BackendConformance
from art_tinker import TinkerBackend


class TestTinkerConformance(BackendConformance):
    learning_rate = 1e-2
    supports_sft = True
    group_size = 3
    max_tokens = 4

    @pytest.fixture
    def backend(self, server: Server) -> TinkerBackend:
        return TinkerBackend(api_key=server.api_key, base_url=server.base_url, lora_rank=4)

    @pytest.fixture
    def base_model(self, tiny_model: str) -> str:
        return tiny_model

    @pytest.fixture
    def fresh_backend(self, server: Server) -> Callable[[], TinkerBackend]:
        return lambda: TinkerBackend(api_key=server.api_key, base_url=server.base_url, lora_rank=4)

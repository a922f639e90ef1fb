"""art's conformance kit, run on BigramBackend: the same contract every shipped backend meets."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from art_core.testing import BackendConformance

from art_bigram import BigramBackend


class TestBigramConformance(BackendConformance):
    learning_rate = 0.5  # a table of logits learns visibly at this rate; the kit's default is for LoRA
    call_timeout_s = 60.0

    @pytest.fixture
    def backend(self) -> BigramBackend:
        return BigramBackend()

    @pytest.fixture
    def base_model(self) -> str:
        return "bigram-letters"

    @pytest.fixture
    def fresh_backend(self) -> Callable[[], BigramBackend]:
        return BigramBackend  # checkpoints live in the model's directory: any new instance resumes

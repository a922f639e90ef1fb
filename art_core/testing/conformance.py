"""``BackendConformance``: the contract every backend meets, as one pytest class to subclass.

::

    from art_core.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend(self, tmp_path):
            return MyBackend(path=tmp_path)

        @pytest.fixture
        def base_model(self):
            return "my-org/tiny-model"

        @pytest.fixture
        def fresh_backend(self, tmp_path):  # supports_resume: a new instance on the same storage
            return lambda: MyBackend(path=tmp_path)

Capability flags (``supports_inference``, ``supports_delete``, ``supports_resume``, ``supports_sft``) say what a
backend does; a claimed capability is always checked, and one the suite cannot check (a missing fixture) fails. Tests run their
coroutines on the kit's own event loop with a timeout, so a hang fails the test instead of the CI job;
pytest-asyncio is not needed. A failure says what the backend did and the rule it broke. Pin the art-core
version your suite was written against: new checks arrive with new versions.

The checks live in three parts: ``training_checks`` (signature, steps, results, failures, resume),
``endpoint_checks`` (names, the model list, API keys, deleted steps) and ``policy_checks`` (training moves the
served policy toward the rewards, logprobs are the model's, every common option has an effect), plus
``sft_conformance`` behind ``supports_sft`` (``train_sft()``: one step, served, resumed, RL continues).
"""

from __future__ import annotations

import pytest

from art_core.testing.endpoint_checks import EndpointChecks
from art_core.testing.kit import Kit, LoopRunner
from art_core.testing.policy_checks import PolicyChecks
from art_core.testing.sft_conformance import SFTChecks
from art_core.testing.suite import PROMPTS
from art_core.testing.training_checks import REQUIRED_METRIC_KEYS, TrainingChecks

__all__ = ["PROMPTS", "REQUIRED_METRIC_KEYS", "BackendConformance", "Kit", "LoopRunner", "standard_tests"]


def standard_tests() -> list[str]:
    """The names of every standard test of the kit."""
    return sorted(name for name in dir(BackendConformance) if name.startswith("test_"))


class BackendConformance(TrainingChecks, EndpointChecks, PolicyChecks, SFTChecks):
    """Subclass and override the ``backend`` and ``base_model`` fixtures (and ``fresh_backend`` to resume)."""

    def test_no_standard_test_is_silently_overridden(self) -> None:
        for name in standard_tests():
            if name in self.deliberately_overridden:
                continue
            if getattr(type(self), name) is not getattr(BackendConformance, name):
                pytest.fail(
                    f"{type(self).__name__} overrides {name}; list it in deliberately_overridden with a reason"
                )

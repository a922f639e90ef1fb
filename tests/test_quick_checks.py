"""The static backend checks behind `art backends --check` and the conformance kit."""

from __future__ import annotations

from collections.abc import Iterable

from art_core.results import TrainResult
from art_core.testing.quick import check_backend_class, refuses_unknown_options, train_signature_problems
from art_core.testing.strict import StrictBackend


def test_strict_backend_passes_every_quick_check() -> None:
    assert all(result == "pass" for _, result, _ in check_backend_class(StrictBackend))


def test_wrong_defaults_kinds_and_missing_options_are_named() -> None:
    async def train(
        self: object,
        model: object,
        trajectory_groups: Iterable[object],
        learning_rate: float = 1e-5,
        *,
        ppo: bool = True,
        epsilon: float | None = None,
        epsilon_high: float | None = None,
        advantage_balance: float = 0.0,
        scale_rewards: bool = True,
        extra: int,
    ) -> TrainResult:
        raise AssertionError

    problems = train_signature_problems(train)
    assert "positional-only parameters are [], not model, trajectory_groups /" in problems
    assert "learning_rate is not keyword-only" in problems
    assert "ppo defaults to True, not False" in problems
    assert "lacks the common option importance_sampling_level" in problems
    assert "option extra has no default" in problems
    assert "plot_tensors" not in refuses_unknown_options(train)

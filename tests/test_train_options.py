"""Every shipped backend refuses a bad common option exactly as ``art_core.TrainOptions`` does, before any work."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import art_core as art
from art_core.testing.option_checks import BOUNDARY_VALUES, expected_error
from art_core.train_options import ADAMW, COMMON_TRAIN_DEFAULTS, check_number


def _local(tmp_path: Path) -> Any:
    from art_local.backend import LocalBackend

    return LocalBackend(path=str(tmp_path), device="cpu")


def _serverless(tmp_path: Path) -> Any:
    from art_serverless import ServerlessBackend

    return ServerlessBackend(api_key="unused", base_url="http://127.0.0.1:9")  # never reached


def _tinker(tmp_path: Path) -> Any:
    from art_tinker import TinkerBackend

    return TinkerBackend(api_key="unused", base_url="http://127.0.0.1:9")  # never reached


def _strict(tmp_path: Path) -> Any:
    return art.testing.StrictBackend()


def _example(tmp_path: Path) -> Any:
    from art_bigram import BigramBackend

    return BigramBackend()


BACKENDS: dict[str, Callable[[Path], Any]] = {
    "local": _local,
    "serverless": _serverless,
    "tinker": _tinker,
    "strict": _strict,
    "example": _example,
}
CASES = [(name, value) for name, values in BOUNDARY_VALUES.items() for value in values]


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
async def test_every_backend_refuses_boundary_values_with_the_core_error(
    backend_name: str, tmp_path: Path
) -> None:
    backend = BACKENDS[backend_name](tmp_path)
    model = art.TrainableModel(name="m", project="p", base_model="any", base_path=str(tmp_path))
    try:
        for name, value in CASES:
            with pytest.raises(
                ValueError
            ) as raised:  # unregistered model, no groups: only the options are checked
                await backend.train(model, [], **{name: value})
            assert str(raised.value) == expected_error(name, value), (backend_name, name, value)
    finally:
        await backend.close()


@pytest.mark.parametrize("value", [0, 0.0, -1e-9, math.inf, -math.inf, math.nan])
def test_learning_rate_must_be_finite_and_positive(value: float) -> None:
    with pytest.raises(
        ValueError, match=r"^learning_rate=\S+ is invalid: learning_rate must be a finite number and > 0"
    ):
        art.TrainOptions(learning_rate=value)


def test_other_bounds_types_and_defaults() -> None:
    assert art.TrainOptions(learning_rate=1, epsilon=0.0, advantage_balance=-1.0).learning_rate == 1
    with pytest.raises(TypeError, match="ppo=1 has type int; ppo must be True or False"):
        art.TrainOptions(ppo=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="learning_rate='1e-5' has type str"):
        art.TrainOptions(learning_rate="1e-5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="importance_sampling_level='tokens' is invalid: use one of 'token'"):
        art.TrainOptions(importance_sampling_level="tokens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="advantage_balance=2 is invalid.*use b > 0 to damp negative"):
        art.TrainOptions(advantage_balance=2)
    with pytest.raises(ValueError, match="epsilon_high=-0.5 is invalid.*or None for the default"):
        art.TrainOptions(epsilon_high=-0.5)
    assert COMMON_TRAIN_DEFAULTS == {
        "learning_rate": 5e-6,
        "ppo": False,
        "epsilon": None,
        "epsilon_high": None,
        "advantage_balance": 0.0,
        "scale_rewards": True,
        "importance_sampling_level": "token",
    }
    assert check_number("x", None, allow_none=True) is None and check_number("x", 2, above=0.0) == 2.0


def test_adamw_defaults_have_one_home() -> None:
    from art_local.training.state import TrainerConfig
    from art_tinker.steps import ADAM

    config = TrainerConfig()
    assert (config.betas, config.eps, config.weight_decay, config.max_grad_norm) == (
        ADAMW.betas,
        ADAMW.eps,
        ADAMW.weight_decay,
        ADAMW.max_grad_norm,
    )
    assert (ADAM["beta1"], ADAM["beta2"], ADAM["eps"], ADAM["grad_clip_norm"]) == (
        *ADAMW.betas,
        ADAMW.eps,
        ADAMW.max_grad_norm,
    )

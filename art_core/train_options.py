"""The ``train()`` options every backend shares, checked in one place: ``TrainOptions`` and its checks.

A backend builds ``TrainOptions(...)`` on the first line of ``train()``, so a bad value raises before anything is
sent or trained, with the same message on every backend. The ``check_*`` functions check a backend's own options
the same way. ``ADAMW`` holds the optimizer defaults every backend that takes an AdamW step shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal, TypeAlias, get_args

ImportanceSamplingLevel: TypeAlias = Literal["token", "sequence", "average", "geometric_average"]
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = get_args(ImportanceSamplingLevel)


BALANCE_FIX = "use b > 0 to damp negative advantages and b < 0 to damp positive ones"


def check_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    allow_none: bool = False,
    fix: str = "",
) -> float | None:
    """``value`` as a float when it is a finite number in bounds (or None when allowed); else raise naming it.

    A bool or a non-number is a ``TypeError``; NaN, ±inf or a value out of bounds is a ``ValueError``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        none = " or None" if allow_none else ""
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; {name} must be a number{none}")
    bounds = [
        f"{op} {bound:g}"
        for op, bound in ((">", above), (">=", at_least), ("<=", at_most))
        if bound is not None
    ]
    if (
        not math.isfinite(value)
        or (above is not None and not value > above)
        or (at_least is not None and not value >= at_least)
        or (at_most is not None and not value <= at_most)
    ):
        need = " and ".join(["a finite number", *bounds]) if bounds else "a finite number"
        none = ", or None for the default" if allow_none else ""
        raise ValueError(
            f"{name}={value!r} is invalid: {name} must be {need}{none}{'; ' + fix if fix else ''}"
        )
    return float(value)


def check_flag(name: str, value: object) -> bool:
    """``value`` when it is a bool; else a ``TypeError`` naming ``name`` (1 and "yes" are not flags)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; {name} must be True or False")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` when it is one of ``choices``; else a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is invalid: use one of {', '.join(map(repr, choices))}")
    return value


@dataclass(frozen=True)
class TrainOptions:
    """The options of ``TrainableBackend.train()`` that every backend shares (docs/rl-math.md), self-checking.

    - ``learning_rate`` must be finite and > 0: NaN or inf ruins the weights for good, and 0 (or less) would
      advance the step and write a checkpoint that learned nothing (or unlearned), which is a bug far more
      often than a wish. To measure without learning, do not call ``train()``.
    - ``epsilon`` / ``epsilon_high``: the clip range of the importance ratio; finite and >= 0, or None for the
      backend's default (PPO 0.2 / ε; CISPO 1.0 / 4.0). 0 is allowed: it clips the ratio to exactly 1.
    - ``advantage_balance`` in [-1, 1]: b > 0 damps negative advantages by (1 − b), b < 0 positive ones.
    - ``ppo`` and ``scale_rewards`` are bools; ``importance_sampling_level`` is one of
      ``IMPORTANCE_SAMPLING_LEVELS``.
    """

    learning_rate: float = 5e-6
    ppo: bool = False
    epsilon: float | None = None
    epsilon_high: float | None = None
    advantage_balance: float = 0.0
    scale_rewards: bool = True
    importance_sampling_level: ImportanceSamplingLevel = "token"

    def __post_init__(self) -> None:
        check_number("learning_rate", self.learning_rate, above=0.0, fix="pass e.g. learning_rate=5e-6")
        check_flag("ppo", self.ppo)
        check_number("epsilon", self.epsilon, at_least=0.0, allow_none=True)
        check_number("epsilon_high", self.epsilon_high, at_least=0.0, allow_none=True)
        check_number("advantage_balance", self.advantage_balance, at_least=-1.0, at_most=1.0, fix=BALANCE_FIX)
        check_flag("scale_rewards", self.scale_rewards)
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)


# The defaults of TrainOptions by name; the conformance kit checks that each backend's train() keeps them.
COMMON_TRAIN_DEFAULTS: dict[str, object] = {option.name: option.default for option in fields(TrainOptions)}


@dataclass(frozen=True)
class AdamWDefaults:
    """The AdamW step every backend that owns its optimizer takes unless configured otherwise (torch's defaults,
    with gradient clipping at norm 1)."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0


ADAMW = AdamWDefaults()

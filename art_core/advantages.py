"""Rewards → advantages → per-token weights (docs/rl-math.md §1–§2), as pure functions on plain numbers.

Every backend uses these, so Local, Serverless and Tinker agree on the same batch. No torch here: a trainer
broadcasts the per-trajectory numbers over that trajectory's trained tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from art_core.train_options import BALANCE_FIX, check_number

if TYPE_CHECKING:
    from art_core.trajectories import TrajectoryGroup

STD_EPSILON = 1e-6


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def population_std(values: Sequence[float]) -> float:
    """Standard deviation with ddof 0 (0.0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mu = _mean(values)
    return math.sqrt(math.fsum((value - mu) ** 2 for value in values) / len(values))


def is_trainable_group(rewards: Sequence[float]) -> bool:
    """A group teaches something only when it has two or more trajectories whose rewards differ."""
    return len(rewards) > 1 and min(rewards) != max(rewards)


def group_advantages(rewards: Sequence[float], *, scale_rewards: bool = True) -> list[float]:
    """A_i = r_i − mean(r), divided by (population std + 1e-6) when ``scale_rewards`` (ART's GRPO).

    All-equal rewards (or a single trajectory) give exactly 0 for every trajectory, so nothing is trained.
    """
    for index, reward in enumerate(rewards):
        if not math.isfinite(reward):
            raise ValueError(f"reward of trajectory {index} is {reward}; rewards must be finite")
    if not is_trainable_group(rewards):
        return [0.0] * len(rewards)
    mu = _mean(rewards)
    centred = [reward - mu for reward in rewards]
    if not scale_rewards:
        return centred
    scale = population_std(rewards) + STD_EPSILON
    return [advantage / scale for advantage in centred]


def batch_advantages(groups: Iterable[TrajectoryGroup], *, scale_rewards: bool = True) -> list[list[float]]:
    """``group_advantages`` for each group's trajectories, in order."""
    return [
        group_advantages(
            [trajectory.reward for trajectory in group.trajectories], scale_rewards=scale_rewards
        )
        for group in groups
    ]


def check_advantage_balance(advantage_balance: float) -> float:
    """Raise ValueError unless ``advantage_balance`` is a finite number in [−1, 1] (the check ``TrainOptions`` makes)."""
    check_number("advantage_balance", advantage_balance, at_least=-1.0, at_most=1.0, fix=BALANCE_FIX)
    return advantage_balance


def balance_advantage(advantage: float, advantage_balance: float) -> float:
    """b > 0 scales negative advantages by (1 − b); b < 0 scales positive ones by (1 + b) (ART)."""
    if advantage_balance > 0 and advantage < 0:
        return advantage * (1.0 - advantage_balance)
    if advantage_balance < 0 and advantage > 0:
        return advantage * (1.0 + advantage_balance)
    return advantage


@dataclass(frozen=True)
class NormalizedBatch:
    """Per trained trajectory: the advantage and the weight shared by each of its trained tokens."""

    advantages: list[float]
    token_weights: list[float]


def normalize_batch(
    advantages: Sequence[float], token_counts: Sequence[int], *, advantage_balance: float = 0.0
) -> NormalizedBatch:
    """docs/rl-math.md §2 over all trained tokens of one train() call.

    Each trajectory's tokens share weight 1/(its token count), rescaled so the mean token weight is 1;
    ``advantage_balance`` damps one sign; then advantages are divided by mean(|A|·w) over tokens so the loss
    scale does not depend on the reward scale.
    """
    check_advantage_balance(advantage_balance)
    if len(advantages) != len(token_counts):
        raise ValueError(f"{len(advantages)} advantages but {len(token_counts)} token counts")
    if not advantages:
        return NormalizedBatch([], [])
    for index, count in enumerate(token_counts):
        if count <= 0:
            raise ValueError(f"trajectory {index} has {count} trained tokens; drop it before normalizing")
    total_tokens = sum(token_counts)
    # weight 1/n_i per token, mean over tokens = (#trajectories)/N, so the rescaled weight is N/(T·n_i)
    weights = [total_tokens / (len(token_counts) * count) for count in token_counts]
    balanced = [balance_advantage(advantage, advantage_balance) for advantage in advantages]
    mean_abs = (
        math.fsum(count * abs(a) * w for count, a, w in zip(token_counts, balanced, weights, strict=True))
        / total_tokens
    )
    if mean_abs == 0.0:
        return NormalizedBatch(balanced, weights)
    return NormalizedBatch([advantage / mean_abs for advantage in balanced], weights)


def mean_reward_std_dev(groups: Iterable[TrajectoryGroup]) -> float:
    """Mean over groups (with ≥ 2 trajectories) of the within-group population std of rewards."""
    stds = [
        population_std([trajectory.reward for trajectory in group.trajectories])
        for group in groups
        if len(group.trajectories) > 1
    ]
    return _mean(stds) if stds else 0.0

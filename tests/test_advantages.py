"""docs/rl-math.md §1–§2 against hand computations."""

from __future__ import annotations

import math

import pytest

from art_core.advantages import (
    balance_advantage,
    group_advantages,
    is_trainable_group,
    normalize_batch,
    population_std,
)


def test_scaled_advantages_by_hand() -> None:
    # rewards 0, 1, 2: mean 1, population std sqrt(2/3)
    std = math.sqrt(2 / 3)
    assert group_advantages([0.0, 1.0, 2.0]) == pytest.approx([-1 / (std + 1e-6), 0.0, 1 / (std + 1e-6)])
    assert group_advantages([0.0, 1.0, 2.0], scale_rewards=False) == [-1.0, 0.0, 1.0]


def test_ties_single_trajectory_and_equal_rewards_train_nothing() -> None:
    assert group_advantages([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]  # 0.1*3/3 != 0.1 in floats: still exactly 0
    assert group_advantages([5.0]) == [0.0]
    assert group_advantages([]) == []
    assert not is_trainable_group([2.0, 2.0]) and is_trainable_group([2.0, 2.5])
    ties = group_advantages([1.0, 1.0, 0.0, 0.0], scale_rewards=False)
    assert ties == [0.5, 0.5, -0.5, -0.5]


def test_negative_rewards() -> None:
    # rewards -3, -1: mean -2, std 1
    assert group_advantages([-3.0, -1.0]) == pytest.approx([-1 / (1 + 1e-6), 1 / (1 + 1e-6)])
    assert population_std([-3.0, -1.0]) == 1.0


def test_non_finite_rewards_are_refused_with_the_index() -> None:
    with pytest.raises(ValueError, match="trajectory 1 is nan"):
        group_advantages([0.0, math.nan])


def test_balance_damps_one_sign() -> None:
    assert balance_advantage(-2.0, 0.25) == -1.5 and balance_advantage(2.0, 0.25) == 2.0
    assert balance_advantage(2.0, -0.25) == 1.5 and balance_advantage(-2.0, -0.25) == -2.0
    assert balance_advantage(-2.0, 1.0) == 0.0


@pytest.mark.parametrize("bad", [1.5, -1.01, math.nan])
def test_out_of_range_balance_is_a_value_error(bad: float) -> None:
    with pytest.raises(
        ValueError,
        match=r"advantage_balance=\S+ is invalid: advantage_balance must be a finite number and >= -1 and <= 1",
    ):
        normalize_batch([1.0], [1], advantage_balance=bad)


def test_normalize_batch_by_hand() -> None:
    # two trajectories: A = +1 over 2 tokens, A = -1 over 6 tokens; N = 8, T = 2
    # raw weights 1/2 and 1/6; mean over tokens = 2/8 -> rescaled weights 2 and 2/3 (token mean 1)
    # mean(|A| w) over tokens = (2*1*2 + 6*1*(2/3)) / 8 = 1 -> advantages unchanged
    out = normalize_batch([1.0, -1.0], [2, 6])
    assert out.token_weights == pytest.approx([2.0, 2 / 3])
    assert out.advantages == pytest.approx([1.0, -1.0])
    tokens_mean = (2 * out.token_weights[0] + 6 * out.token_weights[1]) / 8
    assert tokens_mean == pytest.approx(1.0)


def test_normalize_batch_is_reward_scale_free_and_balances() -> None:
    small = normalize_batch([0.1, -0.1], [3, 5])
    large = normalize_batch([10.0, -10.0], [3, 5])
    assert small.advantages == pytest.approx(large.advantages)
    # balance 0.5 halves the negative one before rescaling: |A| = 1 and 0.5 with weights N/(T n)
    balanced = normalize_batch([1.0, -1.0], [2, 2], advantage_balance=0.5)
    assert balanced.advantages == pytest.approx([1 / 0.75, -0.5 / 0.75])
    negative_side = normalize_batch([1.0, -1.0], [2, 2], advantage_balance=-0.5)
    assert negative_side.advantages == pytest.approx([0.5 / 0.75, -1 / 0.75])


def test_normalize_batch_rejects_empty_trajectories_and_length_mismatch() -> None:
    with pytest.raises(ValueError, match="0 trained tokens"):
        normalize_batch([1.0], [0])
    with pytest.raises(ValueError, match="2 advantages but 1"):
        normalize_batch([1.0, 2.0], [1])
    assert normalize_batch([], []).advantages == []

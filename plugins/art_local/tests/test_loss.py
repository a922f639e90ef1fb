"""art_local.training.loss on plain tensors: hand computations, and every option changes the loss or gradient."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from art_local.training.loss import LossConfig, importance_ratio, policy_loss, sequence_mean

# one row, 8 positions: position 0 is context; 1–3 are sequence 0, 4–7 sequence 1
MASK = [False, True, True, True, True, True, True, True]
SEQUENCE = [-1, 0, 0, 0, 1, 1, 1, 1]
NEW = [0.0, -1.0, -2.0, -0.5, -1.5, -0.2, -3.0, -1.0]
DELTA = [0.0, -1.5, -0.5, 0.1, 0.3, 1.0, 2.0, -0.8]  # new − old, so ρ spans 0.22 … 7.4
ADVANTAGES = [0.0, 1.0, 1.0, 1.0, -0.5, -0.5, -0.5, -0.5]
WEIGHTS = [0.0, 1.2, 1.2, 1.2, 0.85, 0.85, 0.85, 0.85]


def _inputs(**overrides: Any) -> dict[str, Any]:
    new = torch.tensor([NEW], requires_grad=True)
    old = torch.tensor([[n - d for n, d in zip(NEW, DELTA, strict=True)]])
    old[0, 0] = math.nan  # context positions carry no sampler logprob
    values: dict[str, Any] = {
        "new_logprobs_BT": new,
        "old_logprobs_BT": old,
        "advantages_BT": torch.tensor([ADVANTAGES]),
        "weights_BT": torch.tensor([WEIGHTS]),
        "loss_mask_BT": torch.tensor([MASK]),
        "sequence_index_BT": torch.tensor([SEQUENCE]),
    }
    values.update(overrides)
    return values


def _run(config: LossConfig, **overrides: Any) -> tuple[float, torch.Tensor, dict[str, float]]:
    values = _inputs(**overrides)
    new = values.pop("new_logprobs_BT")
    result = policy_loss(new, config=config, **values)
    result.loss.backward()
    assert new.grad is not None
    return float(result.loss.detach()), new.grad.clone(), {k: float(v) for k, v in result.metrics.items()}


def _trained() -> list[int]:
    return [t for t, m in enumerate(MASK) if m]


def test_cispo_default_matches_hand_computation() -> None:
    loss, grad, metrics = _run(LossConfig())
    n = len(_trained())
    expected_loss = 0.0
    expected_grad = [0.0] * len(NEW)
    for t in _trained():
        clipped = min(max(math.exp(DELTA[t]), 0.0), 5.0)  # CISPO: ε = 1, ε_high = 4 → [0, 5]
        expected_loss += -clipped * ADVANTAGES[t] * NEW[t] * WEIGHTS[t]
        expected_grad[t] = -clipped * ADVANTAGES[t] * WEIGHTS[t] / (n + 1e-6)
    assert loss == pytest.approx(expected_loss / (n + 1e-6), rel=1e-5)
    assert metrics["loss/train"] == pytest.approx(loss)
    torch.testing.assert_close(grad[0], torch.tensor(expected_grad), rtol=1e-5, atol=1e-7)


def test_ppo_matches_hand_computation_and_clipped_tokens_get_no_gradient() -> None:
    loss, grad, _ = _run(LossConfig(ppo=True))
    n = len(_trained())
    expected_loss = 0.0
    for t in _trained():
        ratio, advantage = math.exp(DELTA[t]), ADVANTAGES[t]
        clipped = min(max(ratio, 0.8), 1.2)
        expected_loss += -min(ratio * advantage, clipped * advantage) * WEIGHTS[t]
        # the unclipped term carries the gradient inside the range, or where it is the smaller one
        live = 0.8 <= ratio <= 1.2 or (ratio > 1.2 and advantage < 0) or (ratio < 0.8 and advantage > 0)
        expected = -ratio * advantage * WEIGHTS[t] / (n + 1e-6) if live else 0.0
        assert float(grad[0, t]) == pytest.approx(expected, abs=1e-6), t
    assert loss == pytest.approx(expected_loss / (n + 1e-6), rel=1e-5)
    assert float(grad[0, 7]) == 0.0  # ρ = 0.45 with A < 0: the clipped term is the minimum → no gradient


def test_epsilon_defaults() -> None:
    assert LossConfig().clip_range() == (1.0, 4.0)
    assert LossConfig(ppo=True).clip_range() == (0.2, 0.2)
    assert LossConfig(ppo=True, epsilon=0.1).clip_range() == (0.1, 0.1)
    assert LossConfig(ppo=True, epsilon_high=0.3).clip_range() == (0.2, 0.3)
    assert LossConfig(epsilon=0.5).clip_range() == (0.5, 4.0)


def test_sequence_mean_and_importance_levels_by_hand() -> None:
    delta = torch.tensor([DELTA])
    mask, sequence = torch.tensor([MASK]), torch.tensor([SEQUENCE])
    means = sequence_mean(delta, sequence, mask)[0].tolist()
    first, second = sum(DELTA[1:4]) / 3, sum(DELTA[4:8]) / 4
    assert means == pytest.approx([0.0, first, first, first, second, second, second, second])
    token = torch.exp(delta)
    sequence_ratio = torch.exp(torch.tensor([[0.0, *[first] * 3, *[second] * 4]]))
    torch.testing.assert_close(
        importance_ratio(delta, sequence, mask, "sequence")[0, 1:], sequence_ratio[0, 1:]
    )
    torch.testing.assert_close(
        importance_ratio(delta, sequence, mask, "average"), (token + sequence_ratio) / 2
    )
    torch.testing.assert_close(
        importance_ratio(delta, sequence, mask, "geometric_average"), torch.sqrt(token * sequence_ratio)
    )


def test_max_negative_advantage_weight_caps_only_negative_advantage_tokens() -> None:
    base = LossConfig(ppo=True, epsilon=10.0)  # wide clip, so the cap is what limits ρ
    _, grad, _ = _run(base)
    _, capped, _ = _run(dataclasses.replace(base, max_negative_advantage_importance_sampling_weight=1.5))
    n = len(_trained())
    for t in _trained():
        ratio = math.exp(DELTA[t])
        if ADVANTAGES[t] > 0 or ratio <= 1.5:
            assert float(capped[0, t]) == pytest.approx(float(grad[0, t]), abs=1e-7), t
        else:  # capped ρ is constant: the token stops contributing gradient
            assert float(capped[0, t]) == 0.0 and float(grad[0, t]) == pytest.approx(
                -ratio * ADVANTAGES[t] * WEIGHTS[t] / (n + 1e-6), rel=1e-5
            )


def test_mask_prob_ratio_zeroes_tokens_outside_the_trust_region() -> None:
    loss, grad, _ = _run(LossConfig(ppo=True, mask_prob_ratio=True))
    n = len(_trained())
    expected = 0.0
    for t in _trained():
        ratio = math.exp(DELTA[t])
        if 0.8 < ratio < 1.2:
            expected += -ratio * ADVANTAGES[t] * WEIGHTS[t]
        else:  # ρ := 0, so the token only adds the constant −min(0, (1 − ε)·A): no gradient
            expected += -min(0.0, 0.8 * ADVANTAGES[t]) * WEIGHTS[t]
            assert float(grad[0, t]) == 0.0
    assert loss == pytest.approx(expected / (n + 1e-6), rel=1e-5)


def test_kimi_k2_tau_and_kl_penalty_by_hand() -> None:
    tau, beta = 0.3, 0.5
    reference = torch.tensor([[0.0, -1.2, -1.8, -0.4, -1.0, -0.5, -2.5, -1.1]])
    loss, _, metrics = _run(LossConfig(kimi_k2_tau=tau, kl_penalty_coef=beta), ref_logprobs_BT=reference)
    trained = _trained()
    kl = {t: NEW[t] - float(reference[0, t]) for t in trained}
    kl_mean = sum(kl.values()) / (len(trained) + 1e-6)
    expected = 0.0
    for t in trained:
        advantage = ADVANTAGES[t] - tau * DELTA[t] + beta * (kl_mean - kl[t])
        expected += -min(max(math.exp(DELTA[t]), 0.0), 5.0) * advantage * NEW[t] * WEIGHTS[t]
    assert loss == pytest.approx(expected / (len(trained) + 1e-6), rel=1e-5)
    assert metrics["loss/kl_policy_ref"] == pytest.approx(kl_mean, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs_BT"):
        _run(LossConfig(kl_penalty_coef=beta))


def test_truncated_importance_sampling_uses_start_of_call_over_sampler_ratio_when_precalculated() -> None:
    bound = 1.5
    loss_plain, _, _ = _run(LossConfig())
    loss, _, _ = _run(LossConfig(truncated_importance_sampling=bound))
    trained = _trained()
    expected = sum(
        -min(math.exp(DELTA[t]), 5.0) * min(math.exp(DELTA[t]), bound) * ADVANTAGES[t] * NEW[t] * WEIGHTS[t]
        for t in trained
    )
    assert loss == pytest.approx(expected / (len(trained) + 1e-6), rel=1e-5) and loss != loss_plain
    original = torch.tensor([[math.nan, *[n - d - 1.0 for n, d in zip(NEW[1:], DELTA[1:], strict=True)]]])
    loss_pre, _, _ = _run(LossConfig(truncated_importance_sampling=bound), original_logprobs_BT=original)
    expected_pre = sum(
        -min(math.exp(DELTA[t]), 5.0) * min(math.exp(1.0), bound) * ADVANTAGES[t] * NEW[t] * WEIGHTS[t]
        for t in trained
    )
    assert loss_pre == pytest.approx(expected_pre / (len(trained) + 1e-6), rel=1e-5)


def test_unknown_old_logprobs_mean_ratio_one_and_masked_garbage_is_harmless() -> None:
    old = torch.full((1, 8), math.nan)
    new = torch.tensor([[math.inf, *NEW[1:]]], requires_grad=True)  # garbage at an untrained position
    result = policy_loss(
        new,
        config=LossConfig(ppo=True),
        **{k: v for k, v in _inputs(old_logprobs_BT=old).items() if k != "new_logprobs_BT"},
    )
    result.loss.backward()
    assert new.grad is not None and torch.isfinite(new.grad).all() and float(new.grad[0, 0]) == 0.0
    trained = _trained()
    expected = sum(-1.0 * ADVANTAGES[t] * WEIGHTS[t] for t in trained) / (len(trained) + 1e-6)
    assert float(result.loss.detach()) == pytest.approx(expected, rel=1e-5)  # ρ = 1 everywhere


def test_denominator_override_for_micro_batches() -> None:
    loss, _, _ = _run(LossConfig())
    values = _inputs()
    new = values.pop("new_logprobs_BT")
    halved = policy_loss(new, config=LossConfig(), num_trained_tokens=14, **values)
    assert float(halved.loss.detach()) == pytest.approx(loss * 7 / 14, rel=1e-5)


OPTION_CHANGES: list[tuple[str, LossConfig, LossConfig, dict[str, Any]]] = [
    ("ppo", LossConfig(), LossConfig(ppo=True), {}),
    ("epsilon", LossConfig(), LossConfig(epsilon=0.5), {}),
    ("epsilon_high", LossConfig(), LossConfig(epsilon_high=1.0), {}),
    ("sequence", LossConfig(), LossConfig(importance_sampling_level="sequence"), {}),
    ("average", LossConfig(), LossConfig(importance_sampling_level="average"), {}),
    ("geometric_average", LossConfig(), LossConfig(importance_sampling_level="geometric_average"), {}),
    ("max_negative", LossConfig(), LossConfig(max_negative_advantage_importance_sampling_weight=1.5), {}),
    ("mask_prob_ratio", LossConfig(), LossConfig(mask_prob_ratio=True), {}),
    ("kimi_k2_tau", LossConfig(), LossConfig(kimi_k2_tau=0.3), {}),
    (
        "kl_penalty_coef",
        LossConfig(),
        LossConfig(kl_penalty_coef=0.5),
        {"ref_logprobs_BT": torch.full((1, 8), -1.0)},
    ),
    ("truncated_importance_sampling", LossConfig(), LossConfig(truncated_importance_sampling=1.5), {}),
]


@pytest.mark.parametrize(
    ("name", "base", "changed", "extra"), OPTION_CHANGES, ids=[o[0] for o in OPTION_CHANGES]
)
def test_each_option_changes_the_loss_or_gradient(
    name: str, base: LossConfig, changed: LossConfig, extra: dict[str, Any]
) -> None:
    loss_a, grad_a, _ = _run(base)
    loss_b, grad_b, _ = _run(changed, **extra)
    assert loss_a != pytest.approx(loss_b, rel=1e-4) or not torch.allclose(grad_a, grad_b, atol=1e-6), name


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="importance_sampling_level"):
        LossConfig(importance_sampling_level="tokens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epsilon"):
        LossConfig(epsilon=-0.1)
    with pytest.raises(ValueError, match="kl_penalty_coef"):
        LossConfig(kl_penalty_coef=-1.0)
    with pytest.raises(ValueError, match="truncated_importance_sampling"):
        LossConfig(truncated_importance_sampling=0.0)

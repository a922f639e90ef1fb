"""The token-level policy loss of docs/rl-math.md §3 as a pure function of tensors (no model, no state).

Shapes: ``_BT`` = [rows, tokens] of a packed batch. Positions where ``loss_mask_BT`` is False contribute
nothing (their values may be anything finite or NaN). The loopback Tinker server reuses this function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from art_core.plugin_api import (
    IMPORTANCE_SAMPLING_LEVELS,
    ImportanceSamplingLevel,
    check_choice,
    check_number,
)

PPO_EPSILON = 0.2
CISPO_EPSILON = 1.0
CISPO_EPSILON_HIGH = 4.0


@dataclass(frozen=True)
class LossConfig:
    """The per-call loss options (docs/architecture.md §5, Local column). ``None`` ε values take the defaults below.

    ``max_negative_advantage_importance_sampling_weight`` caps ρ only on tokens whose advantage is negative
    (ART capped every token despite the name).
    """

    ppo: bool = False
    epsilon: float | None = None
    epsilon_high: float | None = None
    importance_sampling_level: ImportanceSamplingLevel = "token"
    max_negative_advantage_importance_sampling_weight: float | None = None
    mask_prob_ratio: bool = False
    kimi_k2_tau: float | None = None
    kl_penalty_coef: float = 0.0
    truncated_importance_sampling: float | None = None

    def __post_init__(self) -> None:
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        check_number("epsilon", self.epsilon, at_least=0.0, allow_none=True)
        check_number("epsilon_high", self.epsilon_high, at_least=0.0, allow_none=True)
        for name in ("max_negative_advantage_importance_sampling_weight", "truncated_importance_sampling"):
            check_number(name, getattr(self, name), above=0.0, allow_none=True)
        check_number("kimi_k2_tau", self.kimi_k2_tau, allow_none=True)
        check_number("kl_penalty_coef", self.kl_penalty_coef, at_least=0.0)

    def clip_range(self) -> tuple[float, float]:
        """(ε, ε_high): PPO 0.2 / ε; CISPO 1.0 / 4.0 (ART), each overridable."""
        default_low = PPO_EPSILON if self.ppo else CISPO_EPSILON
        epsilon = default_low if self.epsilon is None else self.epsilon
        if self.epsilon_high is not None:
            return epsilon, self.epsilon_high
        return epsilon, (epsilon if self.ppo else CISPO_EPSILON_HIGH)


@dataclass(frozen=True)
class PolicyLoss:
    """The reduced loss (with grad) and detached scalar metrics."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def sequence_mean(
    values_BT: torch.Tensor, sequence_index_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Each masked token gets the mean of ``values`` over the masked tokens of its sequence (0 elsewhere)."""
    slot_BT = torch.where(mask_BT, sequence_index_BT + 1, torch.zeros_like(sequence_index_BT))
    if bool((slot_BT < 0).any()):
        raise ValueError("sequence_index_BT must be >= 0 on trained tokens")
    slots = int(slot_BT.max().item()) + 1 if slot_BT.numel() else 1
    masked_values = torch.where(mask_BT, values_BT, torch.zeros_like(values_BT)).flatten()
    sums = torch.zeros(slots, dtype=values_BT.dtype, device=values_BT.device).index_add(
        0, slot_BT.flatten(), masked_values
    )
    counts = torch.zeros(slots, dtype=values_BT.dtype, device=values_BT.device).index_add(
        0, slot_BT.flatten(), mask_BT.flatten().to(values_BT.dtype)
    )
    means = sums / counts.clamp(min=1.0)
    means = torch.where(torch.arange(slots, device=means.device) == 0, torch.zeros_like(means), means)
    return means[slot_BT]


def importance_ratio(
    delta_BT: torch.Tensor,
    sequence_index_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    level: ImportanceSamplingLevel,
) -> torch.Tensor:
    """ρ per token for ``importance_sampling_level`` (token, sequence, average, geometric_average)."""
    ratio_BT = torch.exp(delta_BT)
    if level == "token":
        return ratio_BT
    sequence_ratio_BT = torch.exp(sequence_mean(delta_BT, sequence_index_BT, mask_BT))
    if level == "sequence":
        return sequence_ratio_BT
    if level == "average":
        return (ratio_BT + sequence_ratio_BT) / 2
    return torch.sqrt(ratio_BT * sequence_ratio_BT)


def _shaped_advantages(
    advantages_BT: torch.Tensor,
    delta_BT: torch.Tensor,
    new_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    config: LossConfig,
    ref_logprobs_BT: torch.Tensor | None,
    metrics: dict[str, torch.Tensor],
    kl_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """A − τ·δ (kimi_k2_tau) + β·(mean(k) − k) (KL to the reference); records ``loss/kl_policy_ref``.

    ``kl_mean`` replaces mean(k) over these tokens (data-parallel ranks pass the mean over all ranks' tokens).
    """
    shaped_BT = advantages_BT
    if config.kimi_k2_tau is not None:
        shaped_BT = shaped_BT - config.kimi_k2_tau * delta_BT.detach()
    if config.kl_penalty_coef > 0:
        if ref_logprobs_BT is None:
            raise ValueError("kl_penalty_coef > 0 needs ref_logprobs_BT (the base model's logprobs)")
        zeros_BT = torch.zeros_like(new_BT)
        kl_BT = torch.where(mask_BT, (new_BT - ref_logprobs_BT.to(new_BT.dtype)).detach(), zeros_BT)
        if kl_mean is None:
            kl_mean = kl_BT.sum() / (mask_BT.sum().to(new_BT.dtype) + 1e-6)
        else:
            kl_mean = kl_mean.to(device=new_BT.device, dtype=new_BT.dtype)
        shaped_BT = shaped_BT + config.kl_penalty_coef * (kl_mean - kl_BT)
        metrics["loss/kl_policy_ref"] = kl_mean
    return shaped_BT


def policy_loss(
    new_logprobs_BT: torch.Tensor,
    *,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    weights_BT: torch.Tensor,
    loss_mask_BT: torch.Tensor,
    sequence_index_BT: torch.Tensor,
    config: LossConfig,
    ref_logprobs_BT: torch.Tensor | None = None,
    original_logprobs_BT: torch.Tensor | None = None,
    num_trained_tokens: float | None = None,
    kl_mean: torch.Tensor | None = None,
) -> PolicyLoss:
    """docs/rl-math.md §3: sum over trained tokens of L_t·w_t divided by (trained tokens + 1e-6).

    ``old_logprobs_BT`` NaN means unknown (old := new.detach()). ``original_logprobs_BT`` are the sampler's
    values when ``old`` was precalculated. ``num_trained_tokens`` overrides the denominator (micro-batches);
    ``kl_mean`` overrides the mean KL of these tokens (data-parallel ranks: the mean over every rank's tokens).
    """
    mask_BT = loss_mask_BT.bool()
    zeros_BT = torch.zeros_like(new_logprobs_BT)
    new_BT = torch.where(mask_BT, new_logprobs_BT, zeros_BT)
    known_BT = mask_BT & torch.isfinite(old_logprobs_BT)
    old_BT = torch.where(known_BT, old_logprobs_BT.to(new_BT.dtype), new_BT.detach())
    delta_BT = new_BT - old_BT
    ratio_BT = importance_ratio(delta_BT, sequence_index_BT, mask_BT, config.importance_sampling_level)
    advantages_BT = torch.where(mask_BT, advantages_BT.to(new_BT.dtype), zeros_BT)
    cap = config.max_negative_advantage_importance_sampling_weight
    if cap is not None:
        ratio_BT = torch.where(advantages_BT < 0, ratio_BT.clamp(max=cap), ratio_BT)
    epsilon, epsilon_high = config.clip_range()
    if config.mask_prob_ratio:
        inside_BT = (ratio_BT > 1 - epsilon) & (ratio_BT < 1 + epsilon_high)
        ratio_BT = torch.where(inside_BT, ratio_BT, zeros_BT)
    token_count = mask_BT.sum().to(new_BT.dtype)
    metrics: dict[str, torch.Tensor] = {}
    effective_BT = _shaped_advantages(
        advantages_BT, delta_BT, new_BT, mask_BT, config, ref_logprobs_BT, metrics, kl_mean
    )
    clipped_BT = ratio_BT.clamp(1 - epsilon, 1 + epsilon_high)
    if config.ppo:
        token_loss_BT = -torch.minimum(ratio_BT * effective_BT, clipped_BT * effective_BT)
    else:
        token_loss_BT = -(clipped_BT.detach() * effective_BT * new_BT)
    bound = config.truncated_importance_sampling
    if bound is not None:
        if original_logprobs_BT is not None:
            original_known_BT = mask_BT & torch.isfinite(original_logprobs_BT)
            original_BT = torch.where(original_known_BT, original_logprobs_BT.to(new_BT.dtype), old_BT)
            truncation_BT = torch.exp(old_BT - original_BT)
        else:
            truncation_BT = ratio_BT
        token_loss_BT = token_loss_BT * truncation_BT.clamp(max=bound).detach()
    weights_BT = torch.where(mask_BT, weights_BT.to(new_BT.dtype), zeros_BT)  # no NaN*0 in the backward pass
    weighted_BT = torch.where(mask_BT, token_loss_BT * weights_BT, zeros_BT)
    denominator = token_count if num_trained_tokens is None else torch.tensor(float(num_trained_tokens))
    loss = weighted_BT.sum() / (denominator.to(new_BT.device) + 1e-6)
    metrics["loss/train"] = loss.detach()
    return PolicyLoss(loss=loss, metrics=metrics)

"""Tinker's built-in losses on one datum's logprobs, as torch functions (the documented formulas, summed).

``new_N`` are the trainer's logprobs of ``target_tokens`` (with grad); ``old`` (``loss_fn_inputs["logprobs"]``)
are the sampler's. Every loss is a plain sum over tokens: any per-token weighting or normalisation is the
caller's, folded into ``weights``/``advantages`` (that is how ``TinkerBackend`` reproduces that of docs/rl-math.md reduction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from art_tinker.server.errors import UserError

Inputs = Mapping[str, torch.Tensor]
Config = Mapping[str, float | str]

DEFAULT_CLIP_LOW = 0.8
DEFAULT_CLIP_HIGH = 1.2
DEFAULT_DRO_BETA = 0.05

_CONFIG_KEYS: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset(),
    "importance_sampling": frozenset(),
    "ppo": frozenset({"clip_low_threshold", "clip_high_threshold"}),
    "cispo": frozenset({"clip_low_threshold", "clip_high_threshold"}),
    "dro": frozenset({"beta"}),
}
_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
}
SUPPORTED = tuple(_CONFIG_KEYS)


def check_loss(loss_fn: str, config: Config) -> None:
    """Refuse an unknown loss or a config key that loss does not read (nothing is silently ignored)."""
    if loss_fn not in _CONFIG_KEYS:
        raise UserError(
            f"loss_fn {loss_fn!r} is not supported by the art loopback server; use one of {SUPPORTED}"
        )
    unknown = set(config) - _CONFIG_KEYS[loss_fn]
    if unknown:
        allowed = sorted(_CONFIG_KEYS[loss_fn]) or "none"
        raise UserError(
            f"loss_fn_config keys {sorted(unknown)} do not apply to {loss_fn!r} (it reads: {allowed})"
        )
    for key, value in config.items():
        if not isinstance(value, float | int) or not math.isfinite(value):
            raise UserError(f"loss_fn_config[{key!r}]={value!r} must be a finite number")


def check_inputs(loss_fn: str, index: int, names: set[str]) -> None:
    """Name the missing ``loss_fn_inputs`` of datum ``index``."""
    missing = [name for name in _REQUIRED_INPUTS[loss_fn] if name not in names]
    if missing:
        raise UserError(f"datum {index}: loss {loss_fn!r} needs loss_fn_inputs {missing}")


def _threshold(inputs: Inputs, config: Config, key: str, default: float, like: torch.Tensor) -> torch.Tensor:
    if key in inputs:  # per-token thresholds, as the SDK allows
        return inputs[key].to(like)
    return torch.full_like(like, float(config.get(key, default)))


def _ratio(new_N: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    return torch.exp(new_N - inputs["logprobs"].to(new_N))


def cross_entropy(new_N: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    weights_N = inputs["weights"].to(new_N) if "weights" in inputs else torch.ones_like(new_N)
    return -(new_N * weights_N).sum()


def importance_sampling(new_N: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    return -(_ratio(new_N, inputs) * inputs["advantages"].to(new_N)).sum()


def ppo(new_N: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    ratio_N = _ratio(new_N, inputs)
    advantages_N = inputs["advantages"].to(new_N)
    low_N = _threshold(inputs, config, "clip_low_threshold", DEFAULT_CLIP_LOW, new_N)
    high_N = _threshold(inputs, config, "clip_high_threshold", DEFAULT_CLIP_HIGH, new_N)
    clipped_N = torch.minimum(torch.maximum(ratio_N, low_N), high_N)
    return -torch.minimum(ratio_N * advantages_N, clipped_N * advantages_N).sum()


def cispo(new_N: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    ratio_N = _ratio(new_N, inputs)
    low_N = _threshold(inputs, config, "clip_low_threshold", DEFAULT_CLIP_LOW, new_N)
    high_N = _threshold(inputs, config, "clip_high_threshold", DEFAULT_CLIP_HIGH, new_N)
    clipped_N = torch.minimum(torch.maximum(ratio_N, low_N), high_N).detach()
    return -(clipped_N * new_N * inputs["advantages"].to(new_N)).sum()


def dro(new_N: torch.Tensor, inputs: Inputs, config: Config) -> torch.Tensor:
    beta = float(config.get("beta", DEFAULT_DRO_BETA))
    delta_N = new_N - inputs["logprobs"].to(new_N)
    return -(new_N * inputs["advantages"].to(new_N) - 0.5 * beta * delta_N**2).sum()


LOSSES: dict[str, Callable[[torch.Tensor, Inputs, Config], torch.Tensor]] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}

"""The pieces of a training step as free functions: state in, state out; the components are the only thing
that changes. The step itself, for one process or many, is ``art_local.training.step``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch

from art_local.training.batch import TrainBatch
from art_local.training.logprobs import logprobs_and_entropy, predicted_positions_BT
from art_local.training.loss import LossConfig, policy_loss
from art_local.training.state import TrainingComponents, TrainingState, attention_implementation

CustomLossFn = Callable[[torch.Tensor, TrainBatch], tuple[torch.Tensor, dict[str, float]]]
LogprobsFn = Callable[[TrainBatch], tuple[torch.Tensor, torch.Tensor]]


def trainable_parameters(components: TrainingComponents) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates (LoRA adapters, or every weight)."""
    return [parameter for parameter in components.model.parameters() if parameter.requires_grad]


def reference_model(components: TrainingComponents) -> torch.nn.Module:
    """A frozen copy of the base model for the KL penalty of full fine-tuning (loaded once, on first use)."""
    if components.reference_model is None:
        from transformers import AutoModelForCausalLM

        frozen: Any = AutoModelForCausalLM.from_pretrained(
            components.base_model,
            dtype=components.compute_dtype,
            attn_implementation=attention_implementation(components.base_model),
        )
        frozen.to(components.device).eval().requires_grad_(False)
        components.reference_model = frozen
    return components.reference_model


def reference_logprobs(components: TrainingComponents, batch: TrainBatch, *, chunk_size: int) -> torch.Tensor:
    """Logprobs of the trained tokens under the base model (LoRA: adapter disabled), without grad."""
    with torch.no_grad():
        if components.is_lora:
            with components.model.disable_adapter():  # type: ignore[operator]
                logprobs_BT, _ = logprobs_and_entropy(
                    components.model, batch, chunk_size=chunk_size, dtype=components.compute_dtype
                )
            return logprobs_BT
        frozen = reference_model(components)
        logprobs_BT, _ = logprobs_and_entropy(
            frozen, batch, chunk_size=chunk_size, dtype=components.compute_dtype
        )
        return logprobs_BT


def compute_logprobs(
    components: TrainingComponents, batch: TrainBatch, *, chunk_size: int = 1024, all_positions: bool = False
) -> torch.Tensor:
    """[rows, T] logprobs under the current weights, without grad; NaN where not computed.

    Computed at trained positions, or at every token predicted inside its segment with ``all_positions``.
    """
    batch = batch.to(components.device)
    with torch.no_grad():
        logprobs_BT, _ = logprobs_and_entropy(
            components.model,
            batch,
            chunk_size=chunk_size,
            dtype=components.compute_dtype,
            all_positions=all_positions,
        )
    selected_BT = predicted_positions_BT(batch, all_positions=all_positions)
    return torch.where(selected_BT, logprobs_BT, torch.full_like(logprobs_BT, math.nan))


def precalculate_old_logprobs(
    components: TrainingComponents, batch: TrainBatch, *, chunk_size: int = 1024
) -> TrainBatch:
    """``old`` := the current policy's logprobs; the sampler's values move to ``original_logprobs_BT``."""
    current_BT = compute_logprobs(components, batch, chunk_size=chunk_size).cpu()
    return replace(batch, old_logprobs_BT=current_BT, original_logprobs_BT=batch.old_logprobs_BT)


def micro_batch_loss(
    components: TrainingComponents,
    micro: TrainBatch,
    loss_config: LossConfig,
    *,
    chunk_size: int,
    total_tokens: int,
    logprobs_fn: LogprobsFn | None = None,
    reference_BT: torch.Tensor | None = None,
    kl_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch over the batch-wide denominator ``total_tokens``, and its metric shares.

    The caller runs ``backward``. ``logprobs_fn(micro)`` replaces the model's forward (data-parallel callers pass
    their DDP/FSDP-wrapped module); ``reference_BT`` and ``kl_mean`` replace the KL reference logprobs and mean.
    """
    chunk = chunk_size
    if loss_config.kl_penalty_coef > 0 and reference_BT is None:
        reference_BT = reference_logprobs(components, micro, chunk_size=chunk)
    if logprobs_fn is None:
        logprobs_BT, entropy_BT = logprobs_and_entropy(
            components.model, micro, chunk_size=chunk, dtype=components.compute_dtype
        )
    else:
        logprobs_BT, entropy_BT = logprobs_fn(micro)
    result = policy_loss(
        logprobs_BT,
        old_logprobs_BT=micro.old_logprobs_BT,
        advantages_BT=micro.advantages_BT,
        weights_BT=micro.weights_BT,
        loss_mask_BT=micro.loss_mask_BT,
        sequence_index_BT=micro.sequence_index_BT,
        config=loss_config,
        ref_logprobs_BT=reference_BT if loss_config.kl_penalty_coef > 0 else None,
        original_logprobs_BT=micro.original_logprobs_BT,
        num_trained_tokens=total_tokens,
        kl_mean=kl_mean,
    )
    shares = {
        "loss/train": float(result.metrics["loss/train"]),
        "loss/entropy": float(entropy_BT[micro.loss_mask_BT].sum()) / total_tokens,
    }
    if "loss/kl_policy_ref" in result.metrics:
        tokens = micro.num_trained_tokens
        shares["loss/kl_policy_ref"] = float(result.metrics["loss/kl_policy_ref"]) * tokens / total_tokens
    return result.loss, shares


def forward_backward_custom(
    components: TrainingComponents, batch: TrainBatch, loss_fn: CustomLossFn, *, chunk_size: int = 1024
) -> dict[str, float]:
    """Backpropagate ``loss_fn(new logprobs_BT with grad, batch)``; returns its metrics plus ``loss/train``."""
    batch = batch.to(components.device)
    logprobs_BT, _ = logprobs_and_entropy(
        components.model, batch, chunk_size=chunk_size, dtype=components.compute_dtype
    )
    loss, metrics = loss_fn(logprobs_BT, batch)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
    loss.backward()
    return {**metrics, "loss/train": float(loss.detach())}


def optim_step(
    components: TrainingComponents,
    state: TrainingState,
    *,
    learning_rate: float,
    tokens: int = 0,
    max_grad_norm: float | None | Literal["config"] = "config",
) -> TrainingState:
    """Clip gradients (to ``TrainerConfig.max_grad_norm`` unless given; None: no clipping), take one AdamW step
    at ``learning_rate``, zero grads."""
    # the optimizer's own list (the trainable parameters, rebound after sharding): walking the module tree for
    # them cost ~0.4 ms a step, a tenth of a tiny model's step
    parameters = [parameter for group in components.optimizer.param_groups for parameter in group["params"]]
    clip = components.config.max_grad_norm if max_grad_norm == "config" else max_grad_norm
    max_norm = math.inf if clip is None else clip
    grads = [parameter for parameter in parameters if parameter.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm)) if grads else 0.0
    if not math.isfinite(norm):
        components.optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(
            f"gradient norm is {norm}; the step was skipped (check rewards and learning rate)"
        )
    for group in components.optimizer.param_groups:
        group["lr"] = learning_rate
    components.optimizer.step()
    components.optimizer.zero_grad(set_to_none=True)
    return TrainingState(
        step=state.step + 1,
        weight_version=state.weight_version + 1,
        tokens_seen=state.tokens_seen + tokens,
        grad_norm=norm,
    )

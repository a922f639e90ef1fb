"""Supervised fine-tuning on the functional trainer: conversations → token examples → NLL steps → state.

One ``LocalBackend.train_sft()`` call is ``train_sft_examples``: the batches and learning rates that
``art_core.sft.SFTOptions`` plans, each an optimizer step on the mean negative log-likelihood of its trained
(assistant) tokens. The model's step advances by one per call, like ``train()``; ``weight_version`` counts the
optimizer steps.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from art_core.sft import SFTOptions, sft_result_metrics
from art_local.training.batch import PackSequence, TrainBatch, pack_sequences
from art_local.training.logprobs import logprobs_and_entropy
from art_local.training.state import TrainingComponents, TrainingState
from art_local.training.step import sft_step
from art_local.training.tokenize import tokenize_history
from art_local.training.world import SingleProcess

SftExample = tuple[tuple[int, ...], tuple[bool, ...]]  # token ids, and which of them the loss trains
PACK_CAPACITY = 128  # tokens per packed row at least


def sft_examples(
    conversations: Sequence[tuple[Sequence[Any], Sequence[Any] | None]],
    tokenizer: Any,
    *,
    max_sequence_length: int,
) -> list[SftExample]:
    """Tokenize each conversation (``art_core.sft.sft_conversations``) with the trainer's chat rendering.

    A conversation longer than ``max_sequence_length`` is cut there; one left with nothing to train is an error.
    """
    examples: list[SftExample] = []
    for index, (items, tools) in enumerate(conversations):
        history = tokenize_history(
            items, tools, tokenizer, allow_training_without_logprobs=True, where=f"SFT example {index}"
        )
        if history is None or not history.num_trained:
            raise ValueError(f"SFT example {index} has no assistant tokens to train on")
        tokens, trained = history.tokens[:max_sequence_length], history.trained[:max_sequence_length]
        if not any(trained):
            raise ValueError(
                f"SFT example {index} has {len(history.tokens)} tokens and its assistant turns start after "
                f"max_sequence_length={max_sequence_length}; shorten it or raise "
                "TrainerConfig.max_sequence_length"
            )
        examples.append((tokens, trained))
    return examples


def sft_batch(examples: Sequence[SftExample]) -> TrainBatch:
    """Pack examples into one batch whose loss mask covers the trained (answer) tokens only."""
    sequences = [
        PackSequence(tokens=tokens, trained=trained, logprobs=(float("nan"),) * len(tokens), group=index)
        for index, (tokens, trained) in enumerate(examples)  # own group each: no prompt sharing
    ]
    capacity = max(PACK_CAPACITY, *(len(tokens) for tokens, _ in examples))
    return pack_sequences(sequences, capacity=capacity, share_prompts=False)


def negative_log_likelihood(
    logprobs_BT: torch.Tensor, batch: TrainBatch
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood of the trained tokens (the SFT loss)."""
    mask_BT = batch.loss_mask_BT
    total = torch.where(mask_BT, logprobs_BT, torch.zeros_like(logprobs_BT)).sum()
    loss = -total / mask_BT.sum().clamp(min=1)
    return loss, {"sft/nll": float(loss.detach())}


def batch_nll(components: TrainingComponents, batch: TrainBatch, *, chunk_size: int = 1024) -> float:
    """Mean NLL of ``batch``'s trained tokens under the current weights, without grad, in micro-batches of
    ``TrainerConfig.micro_batch_rows`` rows sharing one denominator (training runs ``sft_step``)."""
    batch = batch.to(components.device)
    total_tokens = max(batch.num_trained_tokens, 1)
    rows = batch.tokens_BT.shape[0]
    micro_batch_rows = components.config.micro_batch_rows
    size = rows if micro_batch_rows is None else micro_batch_rows
    loss_sum = 0.0
    for start in range(0, rows, size):
        micro = batch.rows(start, start + size)
        if micro.num_trained_tokens == 0:
            continue
        with torch.no_grad():
            logprobs_BT, _ = logprobs_and_entropy(
                components.model, micro, chunk_size=chunk_size, dtype=components.compute_dtype
            )
            mask_BT = micro.loss_mask_BT
            loss = -torch.where(mask_BT, logprobs_BT, torch.zeros_like(logprobs_BT)).sum() / total_tokens
        loss_sum += float(loss)
    return loss_sum


def evaluate_sft_loss(
    components: TrainingComponents,
    examples: Sequence[SftExample],
    *,
    batch_size: int = 8,
) -> float:
    """Token-weighted mean NLL of ``examples`` under the current weights (no gradient): a held-out SFT loss."""
    weighted, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = sft_batch(examples[start : start + batch_size])
        count = batch.num_trained_tokens
        weighted += batch_nll(components, batch) * count
        tokens += count
    return weighted / max(tokens, 1)


@dataclass(frozen=True)
class SFTOutcome:
    """The state after the call (step + 1) and its metrics (``art_core.sft.sft_result_metrics``)."""

    state: TrainingState
    metrics: dict[str, float]


def train_sft_examples(
    components: TrainingComponents,
    state: TrainingState,
    examples: Sequence[SftExample],
    options: SFTOptions,
    *,
    label: str = "model",
    verbose: bool = False,
) -> SFTOutcome:
    """The planned optimizer steps over ``examples``, a progress bar over examples; the step advances by one."""
    from tqdm.auto import tqdm

    plan = options.plan(len(examples))
    bar = tqdm(  # disable=None: only on a terminal, so logs and CI output get no bar
        total=sum(len(b) for b in plan),
        desc=f"sft {label} → step {state.step + 1}",
        unit="example",
        leave=False,
        disable=None,
    )
    losses: list[tuple[float, int]] = []
    after = state
    ranks = SingleProcess(components)
    try:
        for index, indices in enumerate(plan):
            batch = sft_batch([examples[i] for i in indices])
            rate = options.learning_rate_at(index, len(plan))
            after, loss = sft_step(ranks, after, batch, learning_rate=rate)
            losses.append((loss, batch.num_trained_tokens))
            bar.update(len(indices))
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
    finally:
        bar.close()
    after = dataclasses.replace(after, step=state.step + 1)
    metrics = sft_result_metrics(losses, len(examples), options.learning_rate)
    metrics["loss/grad_norm"] = after.grad_norm
    if verbose:
        summary = ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))
        print(f"[art_local] {label} SFT step {after.step}: {summary}", file=sys.stderr)
    return SFTOutcome(state=after, metrics=metrics)

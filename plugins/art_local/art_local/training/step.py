"""One optimizer step for any number of ranks, with the single-process maths (docs/rl-math.md §3).

One process is a world of one (``art_local.training.world.SingleProcess``); under torchrun every rank calls
the same ``train_step`` (``art_local.distributed.worker``), which only moves its messages.

How the batch is split: every rank holds the whole packed batch. ``split_rows`` gives each rank whole rows (a
sequence never spans rows), longest first onto the least-loaded rank by non-padding tokens; every rank
computes the same split. Each rank cuts its rows into micro-batches (``micro_batch_rows``) and runs as many
forward/backward passes as the busiest rank, padding with a zero-loss dummy row, so collectives line up.

Why the result equals one process: the loss of a rank is Σ_{its tokens} L_t·w_t / (N + 1e-6) with N the trained
tokens of the whole batch (not of the rank), so the per-rank losses add up to the whole batch's loss. DDP and
FSDP average gradients over ranks, so each rank backpropagates world_size × its loss and the average is the
gradient of the sum. The KL penalty's mean(k) is over the whole batch's tokens (all ranks, all micro-batches).
Gradient clipping then sees the same global norm on every rank, and AdamW takes the same step everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from art_local.training.batch import TrainBatch
from art_local.training.logprobs import predicted_positions_BT
from art_local.training.loss import LossConfig
from art_local.training.state import TrainingComponents, TrainingState
from art_local.training.step_config import StepConfig
from art_local.training.steps import micro_batch_loss, optim_step
from art_local.training.world import Mode, Ranks, SingleProcess

Micros = list[TrainBatch | None]  # this rank's micro-batches; None: a dummy pass for the collectives


def split_rows(batch: TrainBatch, world_size: int) -> list[list[int]]:
    """Row indices per rank: longest row first onto the least-loaded rank (non-padding tokens), sorted."""
    lengths = (batch.segment_ids_BT > 0).sum(dim=1).tolist()
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        rank = min(range(world_size), key=lambda k: (loads[k], k))
        shares[rank].append(row)
        loads[rank] += lengths[row]
    return [sorted(share) for share in shares]


def select_rows(batch: TrainBatch, rows: list[int]) -> TrainBatch:
    """Rows ``rows`` of ``batch``, trailing all-padding columns dropped."""
    index = torch.tensor(rows, dtype=torch.long)
    used_T = (batch.segment_ids_BT[index] > 0).any(dim=0).nonzero()
    length = int(used_T.max()) + 1 if used_T.numel() else 1
    values: dict[str, Any] = {field.name: getattr(batch, field.name) for field in dataclasses.fields(batch)}
    selected: dict[str, Any] = {name: None if v is None else v[index, :length] for name, v in values.items()}
    return TrainBatch(**selected)


def micro_plan(batch: TrainBatch, world_size: int, micro_batch_rows: int | None) -> list[list[list[int]]]:
    """Per rank, its rows cut into micro-batches of at most ``micro_batch_rows`` rows (all rows when None)."""
    plan = []
    for rows in split_rows(batch, world_size):
        size = len(rows) if micro_batch_rows is None else micro_batch_rows
        plan.append([rows[start : start + size] for start in range(0, len(rows), max(size, 1))])
    return plan


def dummy_batch(device: torch.device) -> TrainBatch:
    """One row of two tokens with one predicted position: a forward that touches every weight, for zero loss."""
    return TrainBatch(
        tokens_BT=torch.zeros((1, 2), dtype=torch.long, device=device),
        position_ids_BT=torch.tensor([[0, 1]], device=device),
        segment_ids_BT=torch.ones((1, 2), dtype=torch.long, device=device),
        prefix_segment_ids_BT=torch.zeros((1, 2), dtype=torch.long, device=device),
        loss_mask_BT=torch.tensor([[False, True]], device=device),
        old_logprobs_BT=torch.full((1, 2), math.nan, device=device),
        advantages_BT=torch.zeros((1, 2), device=device),
        weights_BT=torch.zeros((1, 2), device=device),
        sequence_index_BT=torch.tensor([[-1, 0]], device=device),
    )


def local_micro_batches(ranks: Ranks, batch: TrainBatch) -> Micros:
    """This rank's micro-batches on its device, padded with None to the busiest rank's count (at least one)."""
    plan = micro_plan(batch, ranks.world_size, ranks.components.config.micro_batch_rows)
    steps = max(1, max(len(micros) for micros in plan))
    device = ranks.components.device
    mine: Micros = [select_rows(batch, rows).to(device) for rows in plan[ranks.rank]]
    return mine + [None] * (steps - len(mine))


def _no_grad_forward(
    ranks: Ranks, micro: TrainBatch | None, mode: Mode, chunk_size: int
) -> torch.Tensor | None:
    """Logprobs without grad (None for a dummy slot, whose forward still runs for the collectives)."""
    with torch.no_grad():
        batch = micro if micro is not None else dummy_batch(ranks.components.device)
        logprobs_BT, _ = ranks.forward(batch, mode, chunk_size)
    return None if micro is None else logprobs_BT


def current_logprobs(ranks: Ranks, micros: Micros, chunk_size: int) -> list[torch.Tensor | None]:
    """Per micro-batch, the current weights' logprobs at trained positions (NaN elsewhere), without grad."""
    result: list[torch.Tensor | None] = []
    for micro in micros:
        logprobs_BT = _no_grad_forward(ranks, micro, "current", chunk_size)
        if micro is None or logprobs_BT is None:
            result.append(None)
            continue
        selected_BT = predicted_positions_BT(micro, all_positions=False)
        result.append(torch.where(selected_BT, logprobs_BT, torch.full_like(logprobs_BT, math.nan)))
    return result


def global_kl(
    ranks: Ranks, micros: Micros, chunk_size: int
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """mean(new − ref) over the whole batch's trained tokens, and this rank's reference logprobs per micro-batch.

    (None, no references) for one micro-batch in one process: the loss computes both from its own forward.
    """
    if ranks.world_size == 1 and len(micros) == 1:
        return None, [None]
    references: list[torch.Tensor | None] = []
    local_sum, local_count = 0.0, 0.0
    for micro in micros:
        reference_BT = _no_grad_forward(ranks, micro, "reference", chunk_size)
        current_BT = _no_grad_forward(ranks, micro, "current", chunk_size)
        references.append(reference_BT)
        if micro is None or reference_BT is None or current_BT is None:
            continue
        mask_BT = micro.loss_mask_BT.bool()
        local_sum += float((current_BT - reference_BT)[mask_BT].double().sum())
        local_count += float(mask_BT.sum())
    total_sum, total_count = ranks.sum_over_ranks([local_sum, local_count])
    return torch.tensor(total_sum / (total_count + 1e-6), dtype=torch.float32), references


def _policy_forward(ranks: Ranks, chunk_size: int, micro: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return ranks.forward(micro, "policy", chunk_size)


def _dummy_loss(ranks: Ranks, chunk_size: int) -> torch.Tensor:
    logprobs_BT, _ = ranks.forward(dummy_batch(ranks.components.device), "policy", chunk_size)
    return logprobs_BT.sum() * 0.0


def forward_backward_shared(
    ranks: Ranks, micros: Micros, loss: LossConfig, *, chunk_size: int, total_tokens: int
) -> dict[str, float]:
    """This rank's share of docs/rl-math.md §3; after it every rank holds the whole batch's gradient. Metrics summed."""
    with_kl = loss.kl_penalty_coef > 0
    kl_mean, references = global_kl(ranks, micros, chunk_size) if with_kl else (None, [None] * len(micros))
    keys = ["loss/train", "loss/entropy"] + (["loss/kl_policy_ref"] if with_kl else [])
    shares = dict.fromkeys(keys, 0.0)
    forward = functools.partial(_policy_forward, ranks, chunk_size)
    for index, micro in enumerate(micros):
        with ranks.gradient_sync(index == len(micros) - 1):
            if micro is None:
                value = _dummy_loss(ranks, chunk_size)
            else:
                value, part = micro_batch_loss(
                    ranks.components,
                    micro,
                    loss,
                    chunk_size=chunk_size,
                    total_tokens=total_tokens,
                    logprobs_fn=forward,
                    reference_BT=references[index],
                    kl_mean=kl_mean,
                )
                for key, share in part.items():
                    shares[key] += share
            (value * ranks.world_size).backward()  # ranks' gradients are averaged: this makes it their sum
    return dict(zip(keys, ranks.sum_over_ranks([shares[key] for key in keys]), strict=True))


def sft_forward_backward_shared(ranks: Ranks, micros: Micros, *, chunk_size: int, total_tokens: int) -> float:
    """This rank's share of the SFT loss (mean NLL over the whole batch's trained tokens), summed over ranks."""
    share = 0.0
    for index, micro in enumerate(micros):
        with ranks.gradient_sync(index == len(micros) - 1):
            if micro is None:
                value = _dummy_loss(ranks, chunk_size)
            else:
                logprobs_BT, _ = ranks.forward(micro, "policy", chunk_size)
                mask_BT = micro.loss_mask_BT
                value = -torch.where(mask_BT, logprobs_BT, torch.zeros_like(logprobs_BT)).sum() / total_tokens
                share += float(value.detach())
            (value * ranks.world_size).backward()  # the sum of the ranks' gradients, as above
    return ranks.sum_over_ranks([share])[0]


def plot_step(
    ranks: Ranks, batch: TrainBatch, current: list[torch.Tensor | None], *, path: Path, precalculated: bool
) -> None:
    """Gather every rank's current logprobs on rank 0 and write the heatmaps of the whole batch there."""
    plan = micro_plan(batch, ranks.world_size, ranks.components.config.micro_batch_rows)
    mine = [
        (rows, values.cpu())
        for rows, values in zip(plan[ranks.rank], current, strict=False)
        if values is not None
    ]
    gathered = ranks.gather_on_first(mine)
    if gathered is None:
        return
    current_BT = torch.full(batch.tokens_BT.shape, math.nan)
    for pieces in gathered:
        for rows, values_BT in pieces:  # type: ignore[attr-defined]
            current_BT[torch.tensor(rows), : values_BT.shape[1]] = values_BT
    if precalculated:  # the plot shows the batch whose "old" logprobs were recomputed
        batch = dataclasses.replace(
            batch, old_logprobs_BT=current_BT, original_logprobs_BT=batch.old_logprobs_BT
        )
    try:
        from art_local.training.plots import plot_batch

        plot_batch(batch, current_BT, path)
    except ImportError as error:
        warnings.warn(
            f"plot_tensors=True needs matplotlib ({error}); no plot written", RuntimeWarning, stacklevel=2
        )


def _with_old_logprobs(micros: Micros, current: list[torch.Tensor | None]) -> Micros:
    """``old`` := the current policy's logprobs; the sampler's values move to ``original_logprobs_BT``."""
    return [
        None
        if micro is None or values is None
        else dataclasses.replace(micro, old_logprobs_BT=values, original_logprobs_BT=micro.old_logprobs_BT)
        for micro, values in zip(micros, current, strict=True)
    ]


def train_step(
    ranks: Ranks,
    state: TrainingState,
    batch: TrainBatch | None,
    step: StepConfig,
    *,
    learning_rate: float,
    plot_path: Path | None = None,
) -> tuple[TrainingState, dict[str, float]]:
    """Precalculate/plot if asked, forward/backward over all ranks, one AdamW step at ``learning_rate``.

    Every rank returns the same state; the metrics are the whole batch's, with ``time/step_forward_backward_s``
    and ``time/step_optimizer_s``. ``batch=None`` (nothing trainable) advances the step without an update.
    """
    if batch is None:
        return dataclasses.replace(state, step=state.step + 1, grad_norm=0.0), {}
    chunk = step.logprob_calculation_chunk_size
    components = ranks.components
    try:
        micros = local_micro_batches(ranks, batch)
        current = current_logprobs(ranks, micros, chunk) if step.precalculate_logprobs or plot_path else []
        if step.precalculate_logprobs:
            micros = _with_old_logprobs(micros, current)
        if plot_path is not None:
            plot_step(ranks, batch, current, path=plot_path, precalculated=step.precalculate_logprobs)
        started = time.perf_counter()
        total = batch.num_trained_tokens
        metrics = forward_backward_shared(ranks, micros, step.loss, chunk_size=chunk, total_tokens=total)
        metrics["time/step_forward_backward_s"] = time.perf_counter() - started
        started = time.perf_counter()
        after = optim_step(components, state, learning_rate=learning_rate, tokens=total)
        metrics["time/step_optimizer_s"] = time.perf_counter() - started  # rank 0's under torchrun
    finally:
        components.optimizer.zero_grad(set_to_none=True)
    return after, metrics


def sft_step(
    ranks: Ranks, state: TrainingState, batch: TrainBatch, *, learning_rate: float, chunk_size: int = 1024
) -> tuple[TrainingState, float]:
    """One optimizer step on the mean NLL of ``batch``'s trained tokens (``train_sft``); (state, that loss)."""
    try:
        micros = local_micro_batches(ranks, batch)
        total = max(batch.num_trained_tokens, 1)
        loss = sft_forward_backward_shared(ranks, micros, chunk_size=chunk_size, total_tokens=total)
        after = optim_step(
            ranks.components, state, learning_rate=learning_rate, tokens=batch.num_trained_tokens
        )
    finally:
        ranks.components.optimizer.zero_grad(set_to_none=True)
    return after, loss


def forward_backward(
    components: TrainingComponents, batch: TrainBatch, step: StepConfig | None = None
) -> dict[str, float]:
    """The RL loss of docs/rl-math.md §3 on ``batch`` in this process; gradients accumulate into the weights.

    Returns ``loss/train``, ``loss/entropy`` (mean over trained tokens) and, with a KL penalty,
    ``loss/kl_policy_ref``. Micro-batches (``TrainerConfig.micro_batch_rows``) share one denominator.
    """
    step = StepConfig() if step is None else step
    ranks = SingleProcess(components)
    micros = local_micro_batches(ranks, batch)
    return forward_backward_shared(
        ranks,
        micros,
        step.loss,
        chunk_size=step.logprob_calculation_chunk_size,
        total_tokens=batch.num_trained_tokens,
    )

"""One data-parallel optimizer step with the single-process maths (docs/rl-math.md §3).

How the batch is split: the parent packs the batch exactly as the single-process trainer does and every rank
receives all of it. ``split_rows`` gives each rank whole rows (a sequence never spans rows), longest first onto
the least-loaded rank by non-padding tokens; every rank computes the same split. Each rank cuts its rows into
micro-batches (``micro_batch_rows``) and runs as many forward/backward passes as the busiest rank, padding with
a zero-loss dummy row, so DDP's and FSDP's collectives line up.

Why the result equals one process: the loss of a rank is Σ_{its tokens} L_t·w_t / (N + 1e-6) with N the trained
tokens of the whole batch (not of the rank), so the per-rank losses add up to the single-process loss. DDP and
FSDP average gradients over ranks, so each rank backpropagates world_size × its loss and the average is the
gradient of the sum. The KL penalty's mean(k) is reduced over all ranks first. Gradient clipping then sees the
same global norm on every rank, and AdamW takes the same step everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from art_local.distributed.parallel import Mode, Parallel
from art_local.training.batch import TrainBatch
from art_local.training.logprobs import predicted_positions_BT
from art_local.training.state import TrainerConfig, TrainingState
from art_local.training.steps import micro_batch_loss, optim_step


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


def local_micro_batches(parallel: Parallel, batch: TrainBatch, rows: int | None) -> list[TrainBatch | None]:
    """This rank's micro-batches on its device, padded with None to the busiest rank's count (at least one)."""
    plan = micro_plan(batch, parallel.world_size, rows)
    steps = max(1, max(len(micros) for micros in plan))
    mine: list[TrainBatch | None] = [
        select_rows(batch, r).to(parallel.components.device) for r in plan[parallel.rank]
    ]
    return mine + [None] * (steps - len(mine))


def _no_grad_forward(
    parallel: Parallel, micro: TrainBatch | None, mode: Mode, chunk_size: int
) -> torch.Tensor | None:
    """Logprobs without grad (None for a dummy slot, whose forward still runs for the collectives)."""
    with torch.no_grad():
        batch = micro if micro is not None else dummy_batch(parallel.components.device)
        logprobs_BT, _ = parallel.module(batch, mode, chunk_size)
    return None if micro is None else logprobs_BT


def _sum_over_ranks(parallel: Parallel, values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=parallel.control)
    return [float(value) for value in tensor.tolist()]


def current_logprobs(
    parallel: Parallel, micros: list[TrainBatch | None], chunk_size: int
) -> list[torch.Tensor | None]:
    """Per micro-batch, the current weights' logprobs at trained positions (NaN elsewhere), without grad."""
    result: list[torch.Tensor | None] = []
    for micro in micros:
        logprobs_BT = _no_grad_forward(parallel, micro, "current", chunk_size)
        if micro is None or logprobs_BT is None:
            result.append(None)
            continue
        selected_BT = predicted_positions_BT(micro, all_positions=False)
        result.append(torch.where(selected_BT, logprobs_BT, torch.full_like(logprobs_BT, math.nan)))
    return result


def global_kl(
    parallel: Parallel, micros: list[TrainBatch | None], chunk_size: int
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """mean(new − ref) over every rank's trained tokens, and this rank's reference logprobs per micro-batch."""
    references: list[torch.Tensor | None] = []
    local_sum, local_count = 0.0, 0.0
    for micro in micros:
        reference_BT = _no_grad_forward(parallel, micro, "reference", chunk_size)
        current_BT = _no_grad_forward(parallel, micro, "current", chunk_size)
        references.append(reference_BT)
        if micro is None or reference_BT is None or current_BT is None:
            continue
        mask_BT = micro.loss_mask_BT.bool()
        local_sum += float((current_BT - reference_BT)[mask_BT].double().sum())
        local_count += float(mask_BT.sum())
    total_sum, total_count = _sum_over_ranks(parallel, [local_sum, local_count])
    return torch.tensor(total_sum / (total_count + 1e-6), dtype=torch.float32), references


@contextlib.contextmanager
def gradient_sync(parallel: Parallel, enabled: bool) -> Iterator[None]:
    """Reduce gradients over ranks in this backward only when ``enabled`` (the last micro-batch)."""
    if parallel.strategy == "ddp":
        with contextlib.nullcontext() if enabled else parallel.module.no_sync():  # type: ignore[operator]
            yield
        return
    parallel.module.set_requires_gradient_sync(enabled)  # type: ignore[operator]
    try:
        yield
    finally:
        parallel.module.set_requires_gradient_sync(True)  # type: ignore[operator]


def _policy_forward(
    parallel: Parallel, chunk_size: int, micro: TrainBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    return parallel.module(micro, "policy", chunk_size)  # type: ignore[no-any-return]


def forward_backward_shared(
    parallel: Parallel, micros: list[TrainBatch | None], config: TrainerConfig, *, total_tokens: int
) -> dict[str, float]:
    """This rank's share of docs/rl-math.md §3; after it every rank holds the whole batch's gradient. Metrics summed."""
    chunk = config.logprob_calculation_chunk_size
    with_kl = config.loss.kl_penalty_coef > 0
    kl_mean, references = global_kl(parallel, micros, chunk) if with_kl else (None, [None] * len(micros))
    keys = ["loss/train", "loss/entropy"] + (["loss/kl_policy_ref"] if with_kl else [])
    shares = dict.fromkeys(keys, 0.0)
    forward = functools.partial(_policy_forward, parallel, chunk)
    for index, micro in enumerate(micros):
        with gradient_sync(parallel, enabled=index == len(micros) - 1):
            if micro is None:
                logprobs_BT, _ = parallel.module(dummy_batch(parallel.components.device), "policy", chunk)
                loss = logprobs_BT.sum() * 0.0
            else:
                loss, part = micro_batch_loss(
                    parallel.components,
                    micro,
                    config,
                    total_tokens=total_tokens,
                    logprobs_fn=forward,
                    reference_BT=references[index],
                    kl_mean=kl_mean,
                )
                for key, value in part.items():
                    shares[key] += value
            (loss * parallel.world_size).backward()  # ranks' gradients are averaged: this makes it their sum
    return dict(zip(keys, _sum_over_ranks(parallel, [shares[key] for key in keys]), strict=True))


def sft_forward_backward_shared(
    parallel: Parallel, micros: list[TrainBatch | None], config: TrainerConfig, *, total_tokens: int
) -> dict[str, float]:
    """This rank's share of the SFT loss (mean NLL over the whole batch's trained tokens), summed over ranks."""
    forward = functools.partial(_policy_forward, parallel, config.logprob_calculation_chunk_size)
    share = 0.0
    for index, micro in enumerate(micros):
        with gradient_sync(parallel, enabled=index == len(micros) - 1):
            if micro is None:
                logprobs_BT, _ = forward(dummy_batch(parallel.components.device))
                loss = logprobs_BT.sum() * 0.0
            else:
                logprobs_BT, _ = forward(micro)
                mask_BT = micro.loss_mask_BT
                loss = -torch.where(mask_BT, logprobs_BT, torch.zeros_like(logprobs_BT)).sum() / total_tokens
                share += float(loss.detach())
            torch.autograd.backward(loss * parallel.world_size)  # the sum of the ranks' gradients, as above
    return {"loss/sft": _sum_over_ranks(parallel, [share])[0]}


def _plot(
    parallel: Parallel,
    batch: TrainBatch,
    current: list[torch.Tensor | None],
    config: TrainerConfig,
    *,
    path: Path,
    precalculated: bool,
) -> None:
    """Gather every rank's current logprobs on rank 0 and write the heatmaps of the whole batch there."""
    plan = micro_plan(batch, parallel.world_size, config.micro_batch_rows)
    mine = [
        (rows, values.cpu())
        for rows, values in zip(plan[parallel.rank], current, strict=False)
        if values is not None
    ]
    gathered: list[object] = [None] * parallel.world_size
    dist.all_gather_object(gathered, mine, group=parallel.control)
    if parallel.rank != 0:
        return
    current_BT = torch.full(batch.tokens_BT.shape, math.nan)
    for pieces in gathered:
        for rows, values_BT in pieces:  # type: ignore[attr-defined]
            current_BT[torch.tensor(rows), : values_BT.shape[1]] = values_BT
    if precalculated:  # as in one process: the plot shows the batch whose "old" logprobs were recomputed
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


def train_step(
    parallel: Parallel,
    state: TrainingState,
    batch: TrainBatch | None,
    config: TrainerConfig,
    *,
    precalculate_logprobs: bool = False,
    plot_path: Path | None = None,
    sft: bool = False,
) -> tuple[TrainingState, dict[str, float]]:
    """Precalculate/plot if asked, forward/backward over all ranks, one AdamW step; same state on every rank.

    ``sft``: the loss is the batch's mean NLL (``train_sft``) and the caller sets the step it reports."""
    if batch is None:
        return dataclasses.replace(state, step=state.step + 1, grad_norm=0.0), {}
    micros = local_micro_batches(parallel, batch, config.micro_batch_rows)
    if sft:
        metrics = sft_forward_backward_shared(parallel, micros, config, total_tokens=batch.num_trained_tokens)
        return optim_step(parallel.components, state, config, tokens=batch.num_trained_tokens), metrics
    chunk = config.logprob_calculation_chunk_size
    current = current_logprobs(parallel, micros, chunk) if precalculate_logprobs or plot_path else []
    if precalculate_logprobs:
        micros = [
            None
            if micro is None or values is None
            else dataclasses.replace(
                micro, old_logprobs_BT=values, original_logprobs_BT=micro.old_logprobs_BT
            )
            for micro, values in zip(micros, current, strict=True)
        ]
    if plot_path is not None:
        _plot(parallel, batch, current, config, path=plot_path, precalculated=precalculate_logprobs)
    started = time.perf_counter()
    metrics = forward_backward_shared(parallel, micros, config, total_tokens=batch.num_trained_tokens)
    metrics["time/step_forward_backward_s"] = time.perf_counter() - started
    started = time.perf_counter()
    after = optim_step(parallel.components, state, config, tokens=batch.num_trained_tokens)
    metrics["time/step_optimizer_s"] = time.perf_counter() - started  # rank 0's, like the metrics above
    return after, metrics

"""``LocalBackend.train_sft()`` with ``train_devices``: the parent tokenizes and packs each planned batch, the
workers take one optimizer step per batch on its mean NLL (``TrainRequest(sft=True)``) and rank 0 writes the
checkpoint of the call's one model step after the last batch."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from art_core.sft import SFTOptions, sft_result_metrics
from art_local.distributed.group import WorkerGroup
from art_local.distributed.protocol import TrainReply, TrainRequest
from art_local.distributed.remote import RemoteOutcome
from art_local.training.sft import SftExample, sft_batch
from art_local.training.state import TrainingState
from art_local.training.step_config import StepConfig


def train_sft_remote(
    group: WorkerGroup,
    state: TrainingState,
    examples: Sequence[SftExample],
    options: SFTOptions,
    *,
    checkpoint_dir: Path | None,
    return_weights: bool,
    label: str = "model",
    verbose: bool = False,
) -> RemoteOutcome:
    """The planned SFT steps on the workers; the state's step advances by one over the whole call."""
    from tqdm.auto import tqdm

    plan = options.plan(len(examples))
    bar = tqdm(
        total=sum(len(b) for b in plan),
        desc=f"sft {label} → step {state.step + 1}",
        unit="example",
        leave=False,
        disable=None,
    )
    losses: list[tuple[float, int]] = []
    current, reply = state, None
    try:
        for index, indices in enumerate(plan):
            batch = sft_batch([examples[i] for i in indices])
            last = index == len(plan) - 1
            request = TrainRequest(
                state=current,  # its step stays the call's start: each optimizer step makes it start + 1
                batch=batch,
                step=StepConfig(),
                learning_rate=options.learning_rate_at(index, len(plan)),
                checkpoint_dir=str(checkpoint_dir) if last and checkpoint_dir is not None else None,
                return_weights=last and return_weights,
                sft=True,
            )
            reply = group.call(request, TrainReply)
            current = dataclasses.replace(reply.state, step=state.step)
            losses.append((reply.metrics["loss/sft"], batch.num_trained_tokens))
            bar.update(len(indices))
    finally:
        bar.close()
    assert reply is not None
    metrics = sft_result_metrics(losses, len(examples), options.learning_rate)
    metrics["loss/grad_norm"] = reply.state.grad_norm
    if verbose:
        summary = ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))
        print(f"[art_local] {label} SFT step {reply.state.step}: {summary}", file=sys.stderr)
    return RemoteOutcome(state=reply.state, metrics=metrics, weights=reply.weights)

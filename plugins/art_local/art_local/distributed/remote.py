"""``LocalBackend``'s distributed path: start a worker group for a model, and one ``train()`` call through it.

The parent keeps what is cheap and must fail early: validation, advantages, tokenization and packing
(``prepare_batch``, so bad input raises exactly as in one process and nothing is sent), the ``TrainingState``, and
the metrics of the data. The workers hold the model and optimizer and write the checkpoints.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from art_core.trajectories import TrajectoryGroup
from art_local.distributed.config import DistributedConfig
from art_local.distributed.group import WorkerGroup
from art_local.distributed.protocol import (
    LoadReply,
    LoadRequest,
    SetupReply,
    SetupRequest,
    TrainReply,
    TrainRequest,
    WeightsReply,
    WeightsRequest,
)
from art_local.training.call import CallOptions, prepare_call
from art_local.training.checkpoint import checkpoint_steps, remove_stale_temporaries
from art_local.training.state import TrainerConfig, TrainingState


def start_workers(
    base_model: str,
    config: TrainerConfig,
    distributed: DistributedConfig,
    checkpoints_dir: Path,
    *,
    allow_config_mismatch: bool,
    log_path: Path,
) -> tuple[WorkerGroup, TrainingState, bool]:
    """Launch, build the model on every rank, resume from the last complete checkpoint; (group, state, is_lora).

    A checkpoint that does not fit raises the same ``CheckpointMismatchError`` as one process, and the workers
    are stopped.
    """
    remove_stale_temporaries(checkpoints_dir)
    steps = checkpoint_steps(checkpoints_dir)
    group = WorkerGroup.start(distributed, log_path=log_path)
    try:
        timeout = distributed.start_timeout_s
        setup = SetupRequest(base_model=base_model, config=config, strategy=distributed.strategy)
        ready = group.call(setup, SetupReply, timeout_s=timeout)
        state = TrainingState()
        if steps:
            directory = str(checkpoints_dir / f"{steps[-1]:04d}")
            load = LoadRequest(directory, config, allow_config_mismatch=allow_config_mismatch)
            state = group.call(load, LoadReply, timeout_s=timeout).state
    except BaseException:
        group.close()
        raise
    return group, state, ready.is_lora


def merged_weights(group: WorkerGroup) -> dict[str, torch.Tensor]:
    """The current merged weights (for the inference server)."""
    return group.call(WeightsRequest(), WeightsReply).weights


@dataclass(frozen=True)
class RemoteOutcome:
    """The state after the call, its metrics (docs/rl-math.md §4, and ``time/step_*`` spans) and the merged weights if asked."""

    state: TrainingState
    metrics: dict[str, float]
    weights: dict[str, torch.Tensor] | None


def train_remote(
    group: WorkerGroup,
    tokenizer: Any,
    state: TrainingState,
    groups: Sequence[TrajectoryGroup],
    config: TrainerConfig,
    options: CallOptions,
    *,
    model_dir: Path,
    checkpoint_dir: Path | None,
    return_weights: bool,
    label: str = "model",
) -> RemoteOutcome:
    """``train_on_groups`` with the step itself on the workers: the same batch, options and metric keys."""
    started = time.perf_counter()
    prepared, config = prepare_call(groups, tokenizer, config, options)
    prepare_s = time.perf_counter() - started
    step = state.step + 1
    request = TrainRequest(
        state=state,
        batch=prepared.batch,
        config=config,
        precalculate_logprobs=options.precalculate_logprobs,
        plot_path=str(model_dir / "tensors" / f"{step:04d}.png") if options.plot_tensors else None,
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        return_weights=return_weights,
    )
    from tqdm.auto import tqdm

    bar = tqdm(
        total=0 if prepared.batch is None else 1,
        desc=f"train {label} → step {step}",
        unit="step",
        leave=False,
        disable=None,  # only on a terminal, like the single-process step: logs and CI output get no bar
    )
    try:
        reply = group.call(request, TrainReply)
        bar.update(0 if prepared.batch is None else 1)
    finally:
        bar.close()
    metrics = prepared.metrics() | reply.metrics | {"time/step_prepare_s": prepare_s}
    metrics["loss/grad_norm"] = reply.state.grad_norm
    metrics["loss/learning_rate"] = config.learning_rate
    metrics["data/step_num_gradient_steps"] = 0.0 if prepared.batch is None else 1.0
    if options.verbose:
        summary = ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))
        print(f"[art_local] {label} step {reply.state.step}: {summary}", file=sys.stderr)
    return RemoteOutcome(state=reply.state, metrics=metrics, weights=reply.weights)

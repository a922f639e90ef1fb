"""``LocalBackend``'s distributed path: start a worker group for a model, and one ``train()`` call through it.

The parent keeps what is cheap and must fail early: validation, advantages, tokenization and packing
(``prepare_batch``, so bad input raises exactly as in one process and nothing is sent), the ``TrainingState``, and
the metrics of the data. The workers hold the model and optimizer and write the checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
from art_local.training.batch import TrainBatch
from art_local.training.call import run_call
from art_local.training.checkpoint import checkpoint_steps, remove_stale_temporaries
from art_local.training.state import TrainerConfig, TrainingState
from art_local.training.step_config import StepConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
            load = LoadRequest(directory, allow_config_mismatch=allow_config_mismatch)
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
    tokenizer: PreTrainedTokenizerBase,
    state: TrainingState,
    groups: Sequence[TrajectoryGroup],
    config: TrainerConfig,
    step: StepConfig,
    *,
    model_dir: Path,
    checkpoint_dir: Path | None,
    return_weights: bool,
    label: str = "model",
) -> RemoteOutcome:
    """``run_call`` with the step on the workers: each rank runs the same ``train_step`` as one process."""
    replies: list[TrainReply] = []

    def run(
        before: TrainingState, batch: TrainBatch | None, learning_rate: float, plot_path: Path | None
    ) -> tuple[TrainingState, dict[str, float]]:
        request = TrainRequest(
            state=before,
            batch=batch,
            step=step,
            learning_rate=learning_rate,
            plot_path=None if plot_path is None else str(plot_path),
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
            return_weights=return_weights,
        )
        replies.append(group.call(request, TrainReply))
        return replies[-1].state, replies[-1].metrics

    outcome = run_call(
        run,
        tokenizer,
        state,
        groups,
        step,
        max_sequence_length=config.max_sequence_length,
        model_dir=model_dir,
        label=label,
    )
    return RemoteOutcome(state=outcome.state, metrics=outcome.metrics, weights=replies[-1].weights)

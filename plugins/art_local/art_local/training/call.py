"""One ``LocalBackend.train()`` call, for one process or a worker group: groups → batch → one step → metrics.

``run_call`` does everything around the step once for both (prepare the batch, bind the step's learning
rate, the progress bar, the metrics of the data and the ``time/step_*_s`` spans, ``verbose``); the step itself
is a ``StepRunner``: ``art_local.training.step.train_step`` here (``train_on_groups``), a request to the
workers that call the same function under torchrun (``art_local.distributed.remote``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from art_core.trajectories import TrajectoryGroup
from art_local.training.batch import PreparedBatch, TrainBatch, prepare_batch
from art_local.training.state import TrainingComponents, TrainingState
from art_local.training.step import train_step
from art_local.training.step_config import StepConfig
from art_local.training.world import SingleProcess

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# (state before, packed batch or None, the step's learning rate, where to plot or None) → (state after, metrics)
StepRunner = Callable[
    [TrainingState, TrainBatch | None, float, Path | None], tuple[TrainingState, dict[str, float]]
]


@dataclass(frozen=True)
class StepOutcome:
    """The state after the call and its metrics (docs/rl-math.md §4), with ``time/step_*_s`` spans of its phases."""

    state: TrainingState
    metrics: dict[str, float]


def prepare_call(
    groups: Sequence[TrajectoryGroup],
    tokenizer: PreTrainedTokenizerBase,
    step: StepConfig,
    *,
    max_sequence_length: int,
) -> PreparedBatch:
    """The call's packed batch (chat template, tokenize, advantages, pack)."""
    return prepare_batch(
        groups,
        tokenizer,
        scale_rewards=step.scale_rewards,
        advantage_balance=step.advantage_balance,
        allow_training_without_logprobs=step.allow_training_without_logprobs,
        max_sequence_length=max_sequence_length,
    )


def run_call(
    run: StepRunner,
    tokenizer: PreTrainedTokenizerBase,
    state: TrainingState,
    groups: Sequence[TrajectoryGroup],
    step: StepConfig,
    *,
    max_sequence_length: int,
    model_dir: Path,
    label: str = "model",
) -> StepOutcome:
    """Prepare the batch, run one step on it (none without a trainable group; the step advances either way)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    prepared = prepare_call(groups, tokenizer, step, max_sequence_length=max_sequence_length)
    spans = {
        "time/step_prepare_s": time.perf_counter()
        - started,  # all of it: validation, advantages, tokens, packing
        "time/step_tokenize_s": prepared.tokenize_s,  # chat template and tokenization
        "time/step_pack_s": prepared.pack_s,
    }
    learning_rate = step.learning_rate_for(prepared.reward_std_dev)
    number = state.step + 1
    plot_path = model_dir / "tensors" / f"{number:04d}.png" if step.plot_tensors else None
    batch = prepared.batch
    bar = tqdm(  # disable=None: only on a terminal, so logs and CI output get no bar per step
        total=0 if batch is None else 1,
        desc=f"train {label} → step {number}",
        unit="step",
        leave=False,
        disable=None,
    )
    try:
        after, step_metrics = run(state, batch, learning_rate, None if batch is None else plot_path)
        if batch is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_metrics['loss/train']:.4g}", grad_norm=f"{after.grad_norm:.3g}")
    finally:
        bar.close()
    metrics = prepared.metrics() | step_metrics
    metrics["loss/grad_norm"] = after.grad_norm
    metrics["loss/learning_rate"] = learning_rate
    metrics["data/step_num_gradient_steps"] = 0.0 if batch is None else 1.0
    metrics |= spans
    if step.verbose:
        summary = ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))
        print(f"[art_local] {label} step {after.step}: {summary}", file=sys.stderr)
    return StepOutcome(state=after, metrics=metrics)


def train_on_groups(
    components: TrainingComponents,
    tokenizer: PreTrainedTokenizerBase,
    state: TrainingState,
    groups: Sequence[TrajectoryGroup],
    step: StepConfig,
    *,
    model_dir: Path,
    label: str = "model",
) -> StepOutcome:
    """``run_call`` with the step in this process (a world of one)."""
    ranks = SingleProcess(components)

    def run(
        before: TrainingState, batch: TrainBatch | None, learning_rate: float, plot_path: Path | None
    ) -> tuple[TrainingState, dict[str, float]]:
        return train_step(ranks, before, batch, step, learning_rate=learning_rate, plot_path=plot_path)

    return run_call(
        run,
        tokenizer,
        state,
        groups,
        step,
        max_sequence_length=components.config.max_sequence_length,
        model_dir=model_dir,
        label=label,
    )

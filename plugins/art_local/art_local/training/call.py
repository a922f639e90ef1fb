"""One ``LocalBackend.train()`` call as a free function: groups → batch → loss → one optimizer step → metrics."""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from art_core.trajectories import TrajectoryGroup
from art_local.training.batch import PreparedBatch, TrainBatch, prepare_batch
from art_local.training.state import TrainerConfig, TrainingComponents, TrainingState
from art_local.training.steps import compute_logprobs, forward_backward, optim_step, precalculate_old_logprobs


@dataclass(frozen=True)
class CallOptions:
    """The ``train()`` options that are neither loss nor trainer settings."""

    scale_rewards: bool = True
    advantage_balance: float = 0.0
    allow_training_without_logprobs: bool = False
    precalculate_logprobs: bool = False
    scale_learning_rate_by_reward_std_dev: bool = False
    plot_tensors: bool = False
    verbose: bool = False


@dataclass(frozen=True)
class StepOutcome:
    """The state after the call and its metrics (docs/rl-math.md §4), with ``time/step_*_s`` spans of its phases."""

    state: TrainingState
    metrics: dict[str, float]


def prepare_call(
    groups: Sequence[TrajectoryGroup], tokenizer: Any, config: TrainerConfig, options: CallOptions
) -> tuple[PreparedBatch, TrainerConfig]:
    """The call's packed batch, and the trainer config with this step's learning rate (scaled by the batch's
    reward std dev when ``scale_learning_rate_by_reward_std_dev``)."""
    prepared = prepare_batch(
        groups,
        tokenizer,
        scale_rewards=options.scale_rewards,
        advantage_balance=options.advantage_balance,
        allow_training_without_logprobs=options.allow_training_without_logprobs,
        max_sequence_length=config.max_sequence_length,
    )
    scale = prepared.reward_std_dev if options.scale_learning_rate_by_reward_std_dev else 1.0
    return prepared, dataclasses.replace(config, learning_rate=config.learning_rate * scale)


def train_on_groups(
    components: TrainingComponents,
    tokenizer: Any,
    state: TrainingState,
    groups: Sequence[TrajectoryGroup],
    config: TrainerConfig,
    options: CallOptions,
    *,
    model_dir: Path,
    label: str = "model",
) -> StepOutcome:
    """Prepare the batch, run forward/backward and one optimizer step (or none without a trainable group).

    The step advances either way. ``plot_tensors`` writes ``{model_dir}/tensors/{step:04d}.png``.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    prepared, config = prepare_call(groups, tokenizer, config, options)  # chat template, tokenize, pack
    spans = {"time/step_prepare_s": time.perf_counter() - started}
    step = state.step + 1
    metrics = prepared.metrics()
    batch = prepared.batch
    bar = tqdm(  # disable=None: only on a terminal, so logs and CI output get no bar per step
        total=0 if batch is None else 1,
        desc=f"train {label} → step {step}",
        unit="step",
        leave=False,
        disable=None,
    )
    try:
        if batch is None:
            after = dataclasses.replace(state, step=step, grad_norm=0.0)
        else:
            if options.precalculate_logprobs:
                batch = precalculate_old_logprobs(components, batch, config)
            if options.plot_tensors:
                plot_step(components, batch, config, model_dir / "tensors" / f"{step:04d}.png")
            started = time.perf_counter()
            metrics |= forward_backward(components, batch, config)
            spans["time/step_forward_backward_s"] = time.perf_counter() - started
            started = time.perf_counter()
            after = optim_step(components, state, config, tokens=batch.num_trained_tokens)
            spans["time/step_optimizer_s"] = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss/train']:.4g}", grad_norm=f"{after.grad_norm:.3g}")
    finally:
        components.optimizer.zero_grad(set_to_none=True)
        bar.close()
    metrics["loss/grad_norm"] = after.grad_norm
    metrics["loss/learning_rate"] = config.learning_rate
    metrics["data/step_num_gradient_steps"] = 0.0 if batch is None else 1.0
    metrics |= spans
    if options.verbose:
        summary = ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))
        print(f"[art_local] {label} step {after.step}: {summary}", file=sys.stderr)
    return StepOutcome(state=after, metrics=metrics)


def plot_step(components: TrainingComponents, batch: TrainBatch, config: TrainerConfig, path: Path) -> None:
    """Heatmaps of the batch and the current logprobs (a warning instead when matplotlib is missing)."""
    try:
        from art_local.training.plots import plot_batch

        current_BT = compute_logprobs(components, batch, chunk_size=config.logprob_calculation_chunk_size)
        plot_batch(batch, current_BT, path)
    except ImportError as error:
        warnings.warn(
            f"plot_tensors=True needs matplotlib ({error}); no plot written", RuntimeWarning, stacklevel=2
        )

"""The pieces of one ``TinkerBackend.train()`` step, as free functions over explicit inputs."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from art_core.plugin_api import ADAMW, ImportanceSamplingLevel, atomic_write_with
from art_core.trajectories import TrajectoryGroup
from art_tinker.datums import missing_logprobs, to_datums
from art_tinker.rl_loss import custom_loss
from art_tinker.runs import LoraChoice, RunRecord

if TYPE_CHECKING:
    import tinker

    from art_local.training.batch import PreparedBatch
    from art_local.training.loss import LossConfig

# art_core's shared AdamW defaults (art-local's TrainerConfig takes the same), so both backends take the same step.
ADAM = {
    "beta1": ADAMW.betas[0],
    "beta2": ADAMW.betas[1],
    "eps": ADAMW.eps,
    "weight_decay": ADAMW.weight_decay,
    "grad_clip_norm": ADAMW.max_grad_norm or 0.0,  # Tinker's 0 means no clipping
}


def load_tokenizer(base_model: str) -> tuple[Any, int]:
    """The base model's tokenizer and context length (from its config)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load the tokenizer of base_model {base_model!r} ({error}); TinkerBackend renders prompts and "
            "tokenizes trajectories locally, so the tokenizer must be loadable here"
        ) from error
    return tokenizer, int(getattr(config, "max_position_embeddings", 0) or 32768)


def resumable(record: RunRecord | None) -> RunRecord | None:
    """The record as a fresh backend resumes it: at the newest step with a saved state."""
    if record is None:
        return None
    latest = record.latest_state()
    step = 0 if latest is None else latest[0]
    if step < record.step:
        warnings.warn(
            f"steps {step + 1}..{record.step} were trained without save_checkpoint=True; resuming from step {step}",
            RuntimeWarning,
            stacklevel=3,
        )
    return replace(record, step=step, checkpoints={s: c for s, c in record.checkpoints.items() if s <= step})


def describe(lora: LoraChoice) -> str:
    return f"rank={lora.rank}, train_mlp={lora.train_mlp}, train_attn={lora.train_attn}, train_unembed={lora.train_unembed}"


@dataclass(frozen=True)
class LossChoice:
    """The docs/rl-math.md loss options a Tinker train() call uses."""

    ppo: bool
    epsilon: float | None
    epsilon_high: float | None
    importance_sampling_level: ImportanceSamplingLevel
    truncated_importance_sampling: float | None

    @property
    def needs_custom(self) -> bool:
        """Built-in ppo/cispo are token-level and untruncated; anything else runs the full loss client-side."""
        return self.importance_sampling_level != "token" or self.truncated_importance_sampling is not None

    def config(self) -> LossConfig:
        from art_local.training.loss import LossConfig

        return LossConfig(
            ppo=self.ppo,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level,
            truncated_importance_sampling=self.truncated_importance_sampling,
        )


class Progress:
    """Prints one line per phase to stderr when ``verbose`` (time since the step started)."""

    def __init__(self, verbose: bool, name: str) -> None:
        self.verbose, self.name, self.started = verbose, name, time.monotonic()

    def __call__(self, message: str) -> None:
        if self.verbose:
            print(
                f"[art_tinker] {self.name} +{time.monotonic() - self.started:.2f}s: {message}",
                file=sys.stderr,
                flush=True,
            )


def prepare(
    groups: Iterable[TrajectoryGroup],
    tokenizer: Any,
    *,
    scale_rewards: bool,
    advantage_balance: float,
    allow_without_logprobs: bool,
    max_sequence_length: int,
) -> PreparedBatch:
    """art-local's batch preparation (validation, advantages, tokenization), without prompt sharing."""
    from art_local.training.batch import prepare_batch

    return prepare_batch(
        groups,
        tokenizer,
        scale_rewards=scale_rewards,
        advantage_balance=advantage_balance,
        allow_training_without_logprobs=allow_without_logprobs,
        max_sequence_length=max_sequence_length,
        share_prompts=False,
    )


def describe_batch(prepared: PreparedBatch) -> str:
    if prepared.batch is None:
        return f"{prepared.num_groups_submitted} groups, none trainable"
    return (
        f"{prepared.num_groups_trainable}/{prepared.num_groups_submitted} groups trainable, "
        f"{len(prepared.sequences)} sequences, {prepared.batch.num_trained_tokens} trained tokens"
    )


@dataclass(frozen=True)
class StepOutcome:
    """What the gradient step did: its metrics, whether weights changed, and per-datum tensors for plots."""

    metrics: dict[str, float]
    changed: bool
    datums: list[tinker.Datum] = field(default_factory=list)
    trainer_logprobs: list[Any] = field(default_factory=list)


async def gradient_step(
    client: tinker.TrainingClient,
    prepared: PreparedBatch,
    loss: LossChoice,
    learning_rate: float,
    log: Callable[[str], None],
    timeout_s: float,
) -> StepOutcome:
    """forward_backward (built-in ppo/cispo, or the custom docs/rl-math.md loss) then optim_step, pipelined."""
    import tinker

    if prepared.batch is None:
        return StepOutcome({"loss/grad_norm": 0.0, "data/step_num_gradient_steps": 0.0}, changed=False)
    sequences = prepared.sequences
    trained_tokens = prepared.batch.num_trained_tokens
    custom = loss.needs_custom or missing_logprobs(sequences)
    data = to_datums(sequences, trained_tokens, custom=custom)
    config = loss.config()
    if custom:
        log("forward_backward_custom (docs/rl-math.md loss evaluated client-side)")
        backward = client.forward_backward_custom(data, custom_loss(config, trained_tokens))
    else:
        low, high = config.clip_range()
        kind: Literal["ppo", "cispo"] = "ppo" if loss.ppo else "cispo"
        log(f"forward_backward {kind} clip [{1 - low:g}, {1 + high:g}]")
        backward = client.forward_backward(
            data, kind, {"clip_low_threshold": 1.0 - low, "clip_high_threshold": 1.0 + high}
        )
    step = client.optim_step(tinker.AdamParams(learning_rate=learning_rate, **ADAM))
    output = await backward.result_async(timeout_s)
    optimizer = await step.result_async(timeout_s)
    log(f"loss {output.metrics.get('loss:sum')}")
    metrics = {"loss/train": float(output.metrics["loss:sum"]), "data/step_num_gradient_steps": 1.0}
    grad_norm = (optimizer.metrics or {}).get("grad_norm:mean")
    if grad_norm is not None:
        metrics["loss/grad_norm"] = float(grad_norm)
    trainer = [out["logprobs"].to_numpy() for out in output.loss_fn_outputs]
    return StepOutcome(metrics, changed=True, datums=data, trainer_logprobs=trainer)


def plot(output_dir: Path, step: int, prepared: PreparedBatch, outcome: StepOutcome) -> Path:
    """``{output_dir}/tensors/{step:04d}.png``: per trained token, advantages and sampler vs trainer logprobs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_tensors=True needs matplotlib: pip install 'art-core[plot]'") from error
    import numpy as np

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    offset = 0
    for sequence, trainer in zip(prepared.sequences, outcome.trainer_logprobs, strict=False):
        mask = np.asarray(sequence.trained[1:], dtype=bool)
        sampler = np.asarray(sequence.logprobs[1:], dtype=np.float32)[mask]
        xs = np.arange(offset, offset + int(mask.sum()))
        top.plot(xs, np.full(len(xs), sequence.advantage * sequence.weight), color="tab:blue")
        bottom.plot(xs, sampler, color="tab:orange", label="sampler" if offset == 0 else None)
        bottom.plot(
            xs, np.asarray(trainer)[mask], color="tab:green", label="trainer" if offset == 0 else None
        )
        offset += len(xs)
    top.set_ylabel("advantage × weight")
    bottom.set_ylabel("logprob")
    bottom.set_xlabel("trained token")
    if offset:
        bottom.legend()
    figure.suptitle(f"step {step}")
    path = output_dir / "tensors" / f"{step:04d}.png"
    atomic_write_with(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)
    return path

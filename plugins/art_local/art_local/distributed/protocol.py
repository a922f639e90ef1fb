"""The requests the parent sends to rank 0 (which broadcasts them to every rank) and the replies rank 0 returns.

One request at a time; each gets exactly one reply (``ShutdownRequest`` too, then the workers exit). Rank 0
broadcasts ``Ping`` to the other ranks while the parent is idle, so no rank waits on a collective longer than
the heartbeat. A failure inside a collective kills the worker group (torchrun reports the traceback); only
rank-0-alone work that fails cleanly (a checkpoint that does not fit) comes back as ``ErrorReply``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from art_local.distributed.config import Strategy

if TYPE_CHECKING:
    import torch

    from art_local.training import StepConfig, TrainBatch, TrainerConfig, TrainingState


@dataclass(frozen=True)
class SetupRequest:
    """Every rank loads ``base_model`` with ``config`` and wraps it for ``strategy``."""

    base_model: str
    config: TrainerConfig
    strategy: Strategy


@dataclass(frozen=True)
class LoadRequest:
    """Rank 0 loads the checkpoint ``directory`` (checked against the setup's config); its weights and optimizer
    state go to every rank."""

    directory: str
    allow_config_mismatch: bool = False


@dataclass(frozen=True)
class TrainRequest:
    """Every rank runs ``art_local.training.step.train_step`` on the packed ``batch`` (None: nothing trainable,
    the step still advances) with the call's ``step`` config, at ``learning_rate``.

    ``sft``: ``sft_step`` instead (the mean NLL of the trained tokens, ``train_sft``). Rank 0 writes
    ``checkpoint_dir`` (atomic, single-process layout) and returns the merged weights when ``return_weights``;
    ``plot_path`` is where rank 0 writes the batch heatmaps.
    """

    state: TrainingState
    batch: TrainBatch | None
    step: StepConfig
    learning_rate: float
    plot_path: str | None = None
    checkpoint_dir: str | None = None
    return_weights: bool = False
    sft: bool = False


@dataclass(frozen=True)
class WeightsRequest:
    """The merged (LoRA-folded) weights of the current state, for the inference server."""


@dataclass(frozen=True)
class ShutdownRequest:
    """Every rank leaves its loop, destroys its process group and exits 0."""


@dataclass(frozen=True)
class Ping:
    """Rank 0 → other ranks only: the parent is idle; wait again."""


Request: TypeAlias = SetupRequest | LoadRequest | TrainRequest | WeightsRequest | ShutdownRequest | Ping


@dataclass(frozen=True)
class SetupReply:
    """The group is ready: ``world_size`` ranks, ``is_lora`` adapter or full weights."""

    world_size: int
    is_lora: bool


@dataclass(frozen=True)
class LoadReply:
    """The state the checkpoint was saved with."""

    state: TrainingState


@dataclass(frozen=True)
class TrainReply:
    """The state after the step, its loss metrics (summed over ranks) and, if asked, the merged weights."""

    state: TrainingState
    metrics: dict[str, float]
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WeightsReply:
    """Merged weights on CPU, keyed as the base model's ``state_dict()``."""

    weights: dict[str, torch.Tensor] = field(repr=False)


@dataclass(frozen=True)
class ShutdownReply:
    """The workers are exiting."""


@dataclass(frozen=True)
class ErrorReply:
    """Rank 0 failed on its own, cleanly: ``error`` (when picklable) and its formatted traceback."""

    error: BaseException | None
    summary: str
    traceback: str


Reply: TypeAlias = SetupReply | LoadReply | TrainReply | WeightsReply | ShutdownReply | ErrorReply

"""The ranks one training step runs on: ``Ranks`` is what the step needs of them, ``SingleProcess`` is a world of one.

A step (``art_local.training.step``) calls the policy only through ``Ranks.module`` (so that DDP's and FSDP's
hooks run under torchrun) and meets the other ranks only through ``sum_over_ranks``, ``gather_on_first`` and
``gradient_sync``. In one process these are no-ops; ``art_local.distributed.parallel.Parallel`` implements them
over ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias, cast

import torch

from art_local.training.batch import TrainBatch
from art_local.training.logprobs import logprobs_and_entropy
from art_local.training.state import TrainingComponents
from art_local.training.steps import reference_logprobs, trainable_parameters

Mode: TypeAlias = Literal["policy", "current", "reference"]


class PolicyModule(torch.nn.Module):
    """The policy as one module: ``forward(batch, mode, chunk_size)`` → (logprobs_BT, entropy_BT).

    ``policy`` computes with grad; ``current`` and ``reference`` (base model: adapter disabled, or the frozen
    copy of a full fine-tune) are for calls under ``torch.no_grad()``. ``touch_all_weights`` adds 0·Σw so that
    every trainable weight gets a gradient on every rank (DDP needs a gradient for each weight it reduces).
    """

    def __init__(self, components: TrainingComponents, *, touch_all_weights: bool) -> None:
        super().__init__()
        self.model = components.model
        self.components = components  # not a Module: a plain attribute, not registered
        self.touch_all_weights = touch_all_weights

    def forward(self, batch: TrainBatch, mode: Mode, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if mode == "reference":
            reference_BT = reference_logprobs(self.components, batch, chunk_size=chunk_size)
            return reference_BT, torch.zeros_like(reference_BT)
        logprobs_BT, entropy_BT = logprobs_and_entropy(
            self.model, batch, chunk_size=chunk_size, dtype=self.components.compute_dtype
        )
        if mode == "policy" and self.touch_all_weights:
            touched = sum(parameter.sum() for parameter in trainable_parameters(self.components))
            logprobs_BT = logprobs_BT + 0.0 * cast(torch.Tensor, touched)
        return logprobs_BT, entropy_BT


class Ranks(Protocol):
    """What a training step needs of the processes it runs on (this one is ``rank`` of ``world_size``)."""

    @property
    def components(self) -> TrainingComponents: ...
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...

    def forward(self, batch: TrainBatch, mode: Mode, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy module's forward (every rank calls it equally often, in the same order)."""
        ...

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Each value summed over every rank (a collective)."""
        ...

    def gather_on_first(self, value: object) -> list[object] | None:
        """Every rank's ``value`` in rank order on rank 0, None elsewhere (a collective)."""
        ...

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        """Reduce gradients over ranks in the backward passes inside only when ``enabled``."""
        ...


@dataclass
class SingleProcess:
    """A world of one: the policy module unwrapped, every collective a no-op."""

    components: TrainingComponents
    rank: int = 0
    world_size: int = 1
    module: PolicyModule = field(init=False)

    def __post_init__(self) -> None:
        self.module = PolicyModule(self.components, touch_all_weights=False)

    def forward(self, batch: TrainBatch, mode: Mode, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(batch, mode, chunk_size)  # type: ignore[no-any-return]

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        return list(values)

    def gather_on_first(self, value: object) -> list[object] | None:
        return [value]

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        yield

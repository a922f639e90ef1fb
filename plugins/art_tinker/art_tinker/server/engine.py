"""The loopback server's engine interface: what the HTTP layer needs from a trainer plus a sampler.

The HTTP layer (``app``/``service``) owns ids, sessions, futures, ordering and the checkpoint store; an engine only
computes. All engine calls run on one worker thread, one at a time, so an engine needs no locking.
``art_tinker.server.local_engine.LocalEngine`` implements it with art-local's functional trainer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from art_tinker.server.store import LoraSpec
from art_tinker.server.wire import DatumArrays, SampledSequence


@dataclass(frozen=True)
class AdamSpec:
    """One optimizer step's hyper-parameters (the SDK's ``AdamParams``).

    The defaults are the SDK's own, for any client that omits a field; ``TinkerBackend`` always sends
    ``art_core.plugin_api.ADAMW``'s values, the step art-local takes.
    """

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass(frozen=True)
class SampleSpec:
    """How to sample: the SDK's ``SamplingParams`` resolved (``stop_tokens`` already includes EOS when implied)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ForwardBackwardResult:
    """Per-datum output arrays (``logprobs`` ``[N]`` at least) and ``name:reduction`` metrics."""

    outputs: Sequence[Mapping[str, npt.NDArray[np.float32]]]
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class ModelLimits:
    """What a base model accepts, read from its config: requests beyond these are refused before any work."""

    vocab_size: int  # token ids lie in [0, vocab_size)
    context_length: int  # tokens of one sequence (max_position_embeddings)
    hidden_size: int  # the LoRA rank cannot usefully exceed it


class TrainerHandle(Protocol):
    """An engine's live training model (weights, optimizer, accumulated gradients)."""


class Engine(Protocol):
    """Trainer plus sampler behind the Tinker API."""

    def resolve_base_model(self, base_model: str) -> str:
        """Check that ``base_model`` can be loaded (fast); raise ``UserError`` naming it otherwise."""
        ...

    def eos_token_ids(self, base_model: str) -> tuple[int, ...]:
        """The token ids that end a sample when the request gives no ``stop``."""
        ...

    def limits(self, base_model: str) -> ModelLimits:
        """Vocabulary, context and width of ``base_model`` (fast: its config only)."""
        ...

    def create(self, base_model: str, lora: LoraSpec) -> TrainerHandle:
        """A fresh LoRA training model on ``base_model``."""
        ...

    def forward_backward(
        self,
        handle: TrainerHandle,
        loss_fn: str,
        config: Mapping[str, float | str],
        data: Sequence[DatumArrays],
        *,
        forward_only: bool,
    ) -> ForwardBackwardResult:
        """Compute a built-in Tinker loss; unless ``forward_only``, accumulate its gradients."""
        ...

    def optim_step(self, handle: TrainerHandle, adam: AdamSpec) -> Mapping[str, float]:
        """Apply and clear the accumulated gradients."""
        ...

    def save(self, handle: TrainerHandle, directory: Path) -> None:
        """Write weights and optimizer state into ``directory`` (which does not exist yet)."""
        ...

    def load(self, handle: TrainerHandle, directory: Path, *, optimizer: bool) -> None:
        """Load weights (and optimizer state when asked) written by ``save``."""
        ...

    def release(self, handle: TrainerHandle) -> None:
        """Free a training model's memory."""
        ...

    def sample(
        self,
        base_model: str,
        weights: Path | None,
        prompt: Sequence[int],
        num_samples: int,
        spec: SampleSpec,
        *,
        prompt_logprobs: bool,
    ) -> tuple[list[SampledSequence], list[float] | None]:
        """Sample from ``base_model`` (with the checkpoint at ``weights`` applied, when given)."""
        ...

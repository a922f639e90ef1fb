"""Trained sequences -> Tinker ``Datum``s.

The sequences come from art-local's ``prepare_batch`` (``art_core.advantages`` for advantages and token weights,
the chat template around each ``Choice``'s sampled ids for tokens), so both backends train the same tokens with
the same numbers. Two datum layouts:

* built-in losses (``ppo``/``cispo``) *sum* token losses, so each trained token's advantage is sent as
  ``A_i * w_i / (N + 1e-6)`` (``N`` = trained tokens of the call): the summed loss is docs/rl-math.md §3's
  ``sum(L_t * w_t) / (N + 1e-6)``;
* the custom loss (``rl_loss``) gets the raw ``A_i`` and ``w_i`` and the trained-token mask, and evaluates
  art-local's ``policy_loss`` on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import tinker

REDUCTION_EPSILON = 1e-6


class TrainedSequence(Protocol):
    """One tokenized history (art-local's ``PackSequence``)."""

    @property
    def tokens(self) -> tuple[int, ...]: ...
    @property
    def trained(self) -> tuple[bool, ...]: ...
    @property
    def logprobs(self) -> tuple[float, ...]: ...
    @property
    def advantage(self) -> float: ...
    @property
    def weight(self) -> float: ...


def missing_logprobs(sequences: Sequence[TrainedSequence]) -> bool:
    """True when a trained token has no sampler logprob (only the custom loss can train it)."""
    return any(math.isnan(lp) for s in sequences for lp, t in zip(s.logprobs, s.trained, strict=True) if t)


def _tensor(values: Sequence[float], dtype: str = "float32") -> Any:
    import tinker

    return tinker.TensorData(data=list(values), dtype=dtype, shape=[len(values)])  # type: ignore[arg-type]


def to_datums(
    sequences: Sequence[TrainedSequence], num_trained_tokens: int, *, custom: bool
) -> list[tinker.Datum]:
    """One ``Datum`` per sequence: ``model_input = seq[:-1]``, ``target_tokens = seq[1:]`` (next-token layout)."""
    import tinker

    total = num_trained_tokens + REDUCTION_EPSILON
    datums = []
    for sequence in sequences:
        trained = sequence.trained[1:]
        old = [
            lp if t else (math.nan if custom else 0.0)
            for lp, t in zip(sequence.logprobs[1:], trained, strict=True)
        ]
        inputs: dict[str, Any] = {
            "target_tokens": _tensor(sequence.tokens[1:], "int64"),
            "logprobs": _tensor(old),
        }
        if custom:
            inputs["advantages"] = _tensor([sequence.advantage if t else 0.0 for t in trained])
            inputs["token_weights"] = _tensor([sequence.weight if t else 0.0 for t in trained])
            inputs["mask"] = _tensor([1.0 if t else 0.0 for t in trained])
        else:
            folded = sequence.advantage * sequence.weight / total
            inputs["advantages"] = _tensor([folded if t else 0.0 for t in trained])
        datums.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(list(sequence.tokens[:-1])), loss_fn_inputs=inputs
            )
        )
    return datums

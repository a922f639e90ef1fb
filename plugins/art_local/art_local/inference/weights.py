"""Loading a full state dict into a served module in place, checked first so a bad one changes nothing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, TypeAlias

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class WeightWriter(Protocol):
    """A weight not computed yet that writes itself into its destination (``art_local.training.LowRankMerge``)."""

    @property
    def shape(self) -> torch.Size: ...

    def copy_to(self, destination: torch.Tensor) -> None: ...


# A full state dict to serve: tensors, or writers that compute a weight straight into the served module.
Weights: TypeAlias = Mapping[str, "torch.Tensor | WeightWriter"]


def check_weights_fit(module: PreTrainedModel, weights: Weights) -> None:
    """Raise unless ``weights`` is a full state dict of ``module`` (tied parameters may be omitted), changing
    nothing."""
    state = module.state_dict()
    unexpected = [k for k in weights if k not in state]
    if unexpected:
        raise ValueError(
            f"weights hold keys the model does not have: {sorted(unexpected)[:5]}; pass the merged "
            "state dict of the same base model (art_local.training.merged_state_dict)"
        )
    params = dict(module.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in weights if k in params}
    missing = [
        k
        for k in state
        if k not in weights and "inv_freq" not in k and (k not in params or id(params[k]) not in loaded)
    ]
    if missing:
        raise ValueError(
            f"weights lack {sorted(missing)[:5]}; pass the full merged state dict of the base model"
        )
    wrong = [k for k, v in weights.items() if tuple(v.shape) != tuple(state[k].shape)]
    if wrong:
        raise ValueError(
            f"weights {sorted(wrong)[:5]} have shapes {[tuple(weights[k].shape) for k in sorted(wrong)[:5]]}, "
            f"the model {[tuple(state[k].shape) for k in sorted(wrong)[:5]]}; pass the base model's merged weights"
        )


def load_weights_into(module: PreTrainedModel, weights: Weights) -> None:
    """Copy a full state dict into ``module`` in place; tied parameters may be omitted, anything else must match."""
    check_weights_fit(module, weights)
    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in weights.items():
            if isinstance(value, torch.Tensor):
                state[key].copy_(value)
            else:
                value.copy_to(state[key])

"""docs/rl-math.md §3's loss for ``forward_backward_custom``, where a built-in Tinker loss cannot express an option.

Used for sequence-level importance sampling (and its averages), truncated importance sampling, and tokens without
sampler logprobs (``old := new.detach()``). The loss is art-local's ``policy_loss`` itself, evaluated client-side
on the logprobs Tinker returns, with the denominator fixed to the call's trained-token count: both backends
compute the same number by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from art_local.training.loss import LossConfig

CustomLoss = Callable[[Sequence[Any], Sequence["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]


def _padded(rows: Sequence[torch.Tensor], fill: float) -> torch.Tensor:
    import torch

    length = max(len(row) for row in rows)
    out = torch.full((len(rows), length), fill, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def custom_loss(config: LossConfig, num_trained_tokens: int) -> CustomLoss:
    """A ``forward_backward_custom`` loss ``(data, logprobs_list) -> (loss, metrics)`` over ``to_datums(custom=True)``."""

    def loss_fn(
        data: Sequence[Any], logprobs_list: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        from art_local.training.loss import policy_loss

        def column(name: str, fill: float) -> torch.Tensor:
            return _padded([d.loss_fn_inputs[name].to_torch().float() for d in data], fill)

        length = max(len(lp) for lp in logprobs_list)
        new_BT = torch.stack(
            [torch.nn.functional.pad(lp.float(), (0, length - len(lp))) for lp in logprobs_list]
        )
        mask_BT = column("mask", 0.0) > 0.5
        # one datum = one sequence (art-local numbers sequences the same way for sequence-level ratios)
        index_BT = torch.arange(len(data)).unsqueeze(-1).expand(mask_BT.shape)
        result = policy_loss(
            new_BT,
            old_logprobs_BT=column("logprobs", float("nan")),
            advantages_BT=column("advantages", 0.0),
            weights_BT=column("token_weights", 0.0),
            loss_mask_BT=mask_BT,
            sequence_index_BT=index_BT,
            config=config,
            num_trained_tokens=float(num_trained_tokens),
        )
        return result.loss, {}

    return loss_fn

"""Tinker datums <-> art-local ``TrainBatch`` rows (one datum per row, no packing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from art_tinker.server.errors import UserError
from art_tinker.server.wire import DatumArrays


@dataclass(frozen=True)
class Row:
    """One datum as a full token sequence: ``model_input + [target_tokens[-1]]`` (``N + 1`` tokens)."""

    tokens: npt.NDArray[np.int64]

    @property
    def num_targets(self) -> int:
        return len(self.tokens) - 1


def rows_for(data: Sequence[DatumArrays]) -> list[Row]:
    """Check each datum's targets are its inputs shifted by one, and build its full sequence."""
    rows = []
    for index, datum in enumerate(data):
        targets = np.asarray(datum.inputs["target_tokens"])
        if targets.ndim != 1 or len(targets) != len(datum.tokens):
            raise UserError(
                f"datum {index}: target_tokens has shape {list(targets.shape)} but model_input has "
                f"{len(datum.tokens)} tokens; they must be 1-D and the same length"
            )
        if len(targets) == 0:
            raise UserError(f"datum {index} is empty; a datum needs at least one target token")
        if not np.array_equal(targets[:-1], datum.tokens[1:]):
            raise UserError(
                f"datum {index}: target_tokens must be model_input shifted by one (input = seq[:-1], "
                "targets = seq[1:]); this server computes the logprob of each next input token"
            )
        for name, values in datum.inputs.items():
            if name != "target_tokens" and np.asarray(values).shape[:1] != (len(targets),):
                raise UserError(f"datum {index}: loss_fn_inputs[{name!r}] must have {len(targets)} entries")
        rows.append(Row(np.concatenate([datum.tokens, targets[-1:]]).astype(np.int64)))
    return rows


def train_batch(rows: Sequence[Row], device: torch.device) -> Any:
    """An art-local ``TrainBatch`` with one row per datum; every target position is in the loss mask."""
    from art_local.training import TrainBatch

    length = max(len(row.tokens) for row in rows)
    shape = (len(rows), length)
    tokens_BT = torch.zeros(shape, dtype=torch.long)
    segment_ids_BT = torch.zeros(shape, dtype=torch.long)
    loss_mask_BT = torch.zeros(shape, dtype=torch.bool)
    sequence_index_BT = torch.full(shape, -1, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        tokens_BT[i, :n] = torch.from_numpy(row.tokens)
        segment_ids_BT[i, :n] = 1
        loss_mask_BT[i, 1:n] = True
        sequence_index_BT[i, 1:n] = i
    position_ids_BT = torch.arange(length).expand(shape).clone()
    return TrainBatch(
        tokens_BT=tokens_BT.to(device),
        position_ids_BT=position_ids_BT.to(device),
        segment_ids_BT=segment_ids_BT.to(device),
        prefix_segment_ids_BT=torch.zeros(shape, dtype=torch.long, device=device),
        loss_mask_BT=loss_mask_BT.to(device),
        old_logprobs_BT=torch.full(shape, float("nan"), device=device),
        advantages_BT=torch.zeros(shape, device=device),
        weights_BT=loss_mask_BT.float().to(device),
        sequence_index_BT=sequence_index_BT.to(device),
    )


def per_datum_logprobs(logprobs_BT: torch.Tensor, rows: Sequence[Row]) -> list[torch.Tensor]:
    """Each datum's logprobs of its ``target_tokens`` (``[N]``), keeping the graph."""
    return [logprobs_BT[i, 1 : len(row.tokens)] for i, row in enumerate(rows)]


def torch_inputs(datum: DatumArrays, device: torch.device) -> dict[str, torch.Tensor]:
    """A datum's ``loss_fn_inputs`` as float32 tensors (target ids are not needed by the losses)."""
    return {
        name: torch.as_tensor(np.asarray(values, dtype=np.float32), device=device)
        for name, values in datum.inputs.items()
        if name != "target_tokens"
    }

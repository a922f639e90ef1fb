"""``plot_tensors=True``: heatmaps of what one train() step saw (tokens, masks, advantages, logprobs)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from art_core.plugin_api import atomic_write_with
from art_local.training.batch import TrainBatch


def plot_batch(batch: TrainBatch, new_logprobs_BT: torch.Tensor | None, path: Path) -> Path:
    """Write a PNG with one heatmap per tensor of ``batch`` (rows × tokens) to ``path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels: list[tuple[str, torch.Tensor]] = [
        ("segment ids", batch.segment_ids_BT.float()),
        ("loss mask (trained tokens)", batch.loss_mask_BT.float()),
        ("advantages", batch.advantages_BT),
        ("token weights", batch.weights_BT),
        ("sampler logprobs", batch.old_logprobs_BT),
    ]
    if new_logprobs_BT is not None:
        masked = torch.where(
            batch.loss_mask_BT, new_logprobs_BT.float(), torch.full_like(new_logprobs_BT, math.nan)
        )
        panels.append(("current logprobs", masked))
    figure, axes = plt.subplots(len(panels), 1, figsize=(12, 1.6 * len(panels) + 0.5), squeeze=False)
    for axis, (title, values) in zip(axes[:, 0], panels, strict=True):
        image = axis.imshow(values.detach().cpu().float().numpy(), aspect="auto", interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.set_ylabel("row")
        figure.colorbar(image, ax=axis)
    axes[-1, 0].set_xlabel("token position")
    figure.tight_layout()
    atomic_write_with(path, lambda handle: figure.savefig(handle, format="png", dpi=80))
    plt.close(figure)
    return path

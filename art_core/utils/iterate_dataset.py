"""Batches of a dataset over epochs, shuffled the same way every run, resumable at a step (ART's semantics)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DatasetBatch(Generic[T]):
    """One step's items, with the global ``step``, the ``epoch`` and the step within it (all 0-based)."""

    items: list[T]
    step: int
    epoch: int
    epoch_step: int
    total_steps: int


def epoch_order(size: int, epoch: int, seed: int = 0) -> list[int]:
    """The shuffled item indices of ``epoch``; ``seed=0`` is ART's order (``random.seed(epoch)``)."""
    rng = random.Random(epoch if seed == 0 else f"{seed}:{epoch}")
    indices = list(range(size))
    rng.shuffle(indices)
    return indices


def _check(groups_per_step: int, num_epochs: int, initial_step: int) -> None:
    for name, value, least in (
        ("groups_per_step", groups_per_step, 1),
        ("num_epochs", num_epochs, 0),
        ("initial_step", initial_step, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__} {value!r}")
        if value < least:
            raise ValueError(f"{name}={value} must be at least {least}")


def iterate_dataset(
    dataset: Sequence[T],
    groups_per_step: int = 1,
    num_epochs: int = 1,
    initial_step: int = 0,
    use_tqdm: bool = True,
    *,
    seed: int = 0,
) -> Iterator[DatasetBatch[T]]:
    """Yield ``DatasetBatch``es of ``groups_per_step`` items for ``num_epochs`` epochs, from ``initial_step`` on.

    Each epoch is a fresh shuffle that depends only on ``(seed, epoch)``, so a run resumed with
    ``initial_step=await model.get_step()`` sees exactly the batches the interrupted run would have seen.
    The last batch of an epoch may be short. ``seed=0`` reproduces OpenPipe ART's batches.
    """
    _check(groups_per_step, num_epochs, initial_step)
    size = len(dataset)
    if size == 0:
        return
    steps_per_epoch = math.ceil(size / groups_per_step)
    total_steps = steps_per_epoch * num_epochs
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(
            initial=min(initial_step, total_steps), total=total_steps, desc="Iterating dataset", unit="batch"
        )
    try:
        for epoch in range(initial_step // steps_per_epoch, num_epochs):
            order = epoch_order(size, epoch, seed)
            for epoch_step in range(steps_per_epoch):
                step = epoch * steps_per_epoch + epoch_step
                if step < initial_step:
                    continue
                start = epoch_step * groups_per_step
                items = [dataset[index] for index in order[start : start + groups_per_step]]
                yield DatasetBatch(items, step, epoch, epoch_step, total_steps)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

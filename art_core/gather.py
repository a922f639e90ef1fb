"""Run many rollouts concurrently with a progress bar and a budget of tolerated failures."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from art_core.gather_context import (
    GatherContext,
    RolloutTimeoutError,
    TooManyExceptionsError,
    bounded,
    current_gather_context,
    gather_context,
)
from art_core.trajectories import Trajectory, TrajectoryGroup, check_rewards

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = [
    "GatherContext",
    "RolloutTimeoutError",
    "TooManyExceptionsError",
    "current_gather_context",
    "gather_trajectories",
    "gather_trajectory_groups",
]

T = TypeVar("T")

AfterEach = Callable[[TrajectoryGroup], Awaitable[TrajectoryGroup | None | list[TrajectoryGroup]]]


def _check_max_exceptions(max_exceptions: int | float) -> None:
    if isinstance(max_exceptions, bool) or not isinstance(max_exceptions, (int, float)):
        raise TypeError(f"max_exceptions must be a count or a fraction in (0, 1), not {max_exceptions!r}")
    if max_exceptions < 0 or math.isnan(max_exceptions):
        raise ValueError(f"max_exceptions={max_exceptions} is negative; use 0 to tolerate no failure")


def _progress_bar(desc: str | None, total: int, leave: bool = True) -> tqdm | None:
    if desc is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, unit="rollout", dynamic_ncols=True, leave=leave)


async def gather_trajectory_groups(
    groups: Iterable[Awaitable[TrajectoryGroup]],
    *,
    pbar_desc: str | None = "gather",
    max_exceptions: int | float = 0,
    max_metrics: int | None = None,
    after_each: AfterEach | None = None,
    pbar_leave: bool = True,
    rollout_timeout_s: float | None = None,
) -> list[TrajectoryGroup]:
    """Await every group concurrently, showing live reward and failures; return the finished groups.

    ``max_exceptions`` is a count of tolerated failed rollouts, or a fraction of all rollouts when in (0, 1).
    A failed rollout inside a group is kept in ``group.exceptions``; a group whose own awaitable fails is
    dropped. ``after_each`` may replace each finished group (return a group, a list of groups, or None to
    drop it). Rewards are checked: a non-finite one is a ValueError naming its group and trajectory.
    ``pbar_leave=False`` clears the bar when done (for loops that print their own line per step).
    ``rollout_timeout_s`` bounds each rollout of a ``TrajectoryGroup`` (or each awaitable that returns a whole
    group): one that runs longer is cancelled and counts as a failed rollout (``RolloutTimeoutError``) toward
    ``max_exceptions``, so one hung request cannot stall a training step.
    """
    _check_max_exceptions(max_exceptions)
    if rollout_timeout_s is not None and not rollout_timeout_s > 0:
        raise ValueError(f"rollout_timeout_s={rollout_timeout_s!r}; give a number of seconds > 0, or None")
    items = list(groups)
    total = sum(item.pending or len(item) if isinstance(item, TrajectoryGroup) else 1 for item in items)
    context = GatherContext(
        total=total,
        max_exceptions=max_exceptions,
        max_metrics=max_metrics,
        rollout_timeout_s=rollout_timeout_s,
    )

    async def finish(item: Awaitable[TrajectoryGroup]) -> list[TrajectoryGroup]:
        if isinstance(item, TrajectoryGroup):
            already_finished = not item.pending
            group = await item  # a pending group counts its rollouts itself as they finish
            if already_finished:
                for trajectory in group.trajectories:
                    context.record_trajectory(trajectory)
        else:
            try:
                group = await bounded(item, rollout_timeout_s)
            except Exception as error:
                context.record_exception(error)
                return []
            for trajectory in group.trajectories:
                context.record_trajectory(trajectory)
        if after_each is None:
            return [group]
        replaced = await after_each(group)
        if replaced is None:
            return []
        return replaced if isinstance(replaced, list) else [replaced]

    results = await _run_all(context, pbar_desc, [finish(item) for item in items], leave=pbar_leave)
    finished = [group for result in results for group in result]
    check_rewards(finished)
    return finished


async def gather_trajectories(
    trajectories: Iterable[Awaitable[Trajectory]],
    *,
    pbar_desc: str | None = "gather",
    max_exceptions: int | float = 0,
) -> list[Trajectory | BaseException]:
    """Await rollouts concurrently; tolerated failures stay in the result list in their place."""
    _check_max_exceptions(max_exceptions)
    items = list(trajectories)
    context = GatherContext(total=len(items), max_exceptions=max_exceptions)

    async def finish(item: Awaitable[Trajectory]) -> Trajectory | BaseException:
        try:
            trajectory = await item
        except Exception as error:
            context.record_exception(error)
            return error
        context.record_trajectory(trajectory)
        return trajectory

    return await _run_all(context, pbar_desc, [finish(item) for item in items])


async def _run_all(
    context: GatherContext,
    pbar_desc: str | None,
    coroutines: list[Coroutine[Any, Any, T]],
    *,
    leave: bool = True,
) -> list[T]:
    """Run the coroutines concurrently under ``context`` with its progress bar; on failure cancel the rest."""
    context.pbar = _progress_bar(pbar_desc, context.total, leave)
    try:
        with gather_context(context):
            tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
    finally:
        if context.pbar is not None:
            context.pbar.close()

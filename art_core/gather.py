"""Run many rollouts concurrently with a progress bar and a budget of tolerated failures."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from art_core.trajectories import Trajectory, TrajectoryGroup, check_rewards

if TYPE_CHECKING:
    from tqdm import tqdm

T = TypeVar("T")

AfterEach = Callable[[TrajectoryGroup], Awaitable[TrajectoryGroup | None | list[TrajectoryGroup]]]


class TooManyExceptionsError(RuntimeError):
    """More rollouts failed than ``max_exceptions`` allows; the last failure is the ``__cause__``."""


class RolloutTimeoutError(TimeoutError):
    """A rollout ran past ``gather_trajectory_groups(rollout_timeout_s=...)``; it counts as a failed rollout."""


async def bounded(awaitable: Awaitable[T], timeout_s: float | None) -> T:
    """``await awaitable``, cancelled with ``RolloutTimeoutError`` after ``timeout_s`` (None: no bound)."""
    if timeout_s is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise RolloutTimeoutError(
            f"a rollout did not finish within rollout_timeout_s={timeout_s:g} s (it was cancelled); raise the "
            "bound or look for a request that hangs"
        ) from None


@dataclass
class GatherContext:
    """Live counters behind one gather call's progress bar."""

    total: int = 0
    max_exceptions: int | float = 0
    pbar: tqdm | None = None
    reward_sum: float = 0.0
    trajectories: int = 0
    exceptions: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_counts: dict[str, int] = field(default_factory=dict)
    max_metrics: int | None = None
    rollout_timeout_s: float | None = None

    def record_trajectory(self, trajectory: Trajectory) -> None:
        self.trajectories += 1
        if math.isfinite(trajectory.reward):
            self.reward_sum += trajectory.reward
        for key, value in trajectory.metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + float(value)
            self.metric_counts[key] = self.metric_counts.get(key, 0) + 1
        self._refresh(advance=1)

    def record_exception(self, error: BaseException) -> None:
        self.exceptions += 1
        self._refresh(advance=1)
        if self.too_many_exceptions():
            raise TooManyExceptionsError(
                f"{self.exceptions} of {self.total} rollouts failed, more than max_exceptions={self.max_exceptions}; "
                f"last failure: {type(error).__name__}: {error}"
            ) from error

    def too_many_exceptions(self) -> bool:
        if 0 < self.max_exceptions < 1:
            return self.exceptions > self.max_exceptions * max(self.total, 1)
        return self.exceptions > self.max_exceptions

    def _refresh(self, advance: int) -> None:
        if self.pbar is None:
            return
        self.pbar.update(advance)
        postfix: dict[str, Any] = {}
        if self.trajectories:
            postfix["reward"] = f"{self.reward_sum / self.trajectories:.3g}"
        keys = list(self.metric_sums)[: self.max_metrics]
        for key in keys:
            postfix[key] = f"{self.metric_sums[key] / self.metric_counts[key]:.3g}"
        postfix["exceptions"] = self.exceptions
        self.pbar.set_postfix(postfix, refresh=False)


_current: contextvars.ContextVar[GatherContext | None] = contextvars.ContextVar(
    "art_gather_context", default=None
)


def current_gather_context() -> GatherContext:
    """The active gather's counters, or a detached context when awaited outside a gather."""
    return _current.get() or GatherContext(max_exceptions=math.inf)


@contextlib.contextmanager
def _gather_context(context: GatherContext) -> Iterator[None]:
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


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
        with _gather_context(context):
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

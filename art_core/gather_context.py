"""What one gather call shares with the groups it awaits: its counters, its failure budget and its timeout.

``TrajectoryGroup`` awaits its rollouts through ``current_gather_context()``, and ``gather`` sets the context;
this module sits below both so that neither imports the other at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tqdm import tqdm

    from art_core.trajectories import Trajectory

T = TypeVar("T")


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
def gather_context(context: GatherContext) -> Iterator[None]:
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


# Users import these from art_core.gather (or art_core); a failed rollout records its error's type by module,
# and that name must not change with where the class happens to be defined.
TooManyExceptionsError.__module__ = RolloutTimeoutError.__module__ = "art_core.gather"

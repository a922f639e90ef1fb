"""``@retry``: call a rollout (or any function) again when it raises one of the given exceptions."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("art_core.retry")

RETRIES_METRIC = "retries"
OnRetry = Callable[[BaseException, int], None]


def _exception_types(exceptions: object) -> tuple[type[BaseException], ...]:
    types = exceptions if isinstance(exceptions, tuple) else (exceptions,)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise TypeError(
            f"exceptions={exceptions!r} must be an exception class or a tuple of them, e.g. (TimeoutError,)"
        )
    return cast("tuple[type[BaseException], ...]", types)


def _check_numbers(max_attempts: int, delay: float, backoff_factor: float, max_delay: float | None) -> None:
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts={max_attempts!r} must be an int of at least 1 (1 = no retry)")
    if delay < 0 or backoff_factor < 1 or (max_delay is not None and max_delay < 0):
        raise ValueError(
            f"delay={delay}, backoff_factor={backoff_factor}, max_delay={max_delay}: delays must be >= 0 "
            "and backoff_factor >= 1"
        )


def _record(result: object, retries: int) -> None:
    """Count the retries in the result's ``metrics`` (a Trajectory or TrajectoryGroup), 0 included."""
    metrics = getattr(result, "metrics", None)
    if isinstance(metrics, dict):
        metrics[RETRIES_METRIC] = metrics.get(RETRIES_METRIC, 0) + retries


@dataclass(frozen=True)
class _Policy:
    max_attempts: int
    delay: float
    backoff_factor: float
    types: tuple[type[BaseException], ...]
    on_retry: OnRetry | None
    max_delay: float | None
    jitter: float

    def wait_before(self, attempt: int, error: BaseException, name: str) -> float:
        """Report retry ``attempt`` of ``name`` and return how long to wait before it."""
        if self.on_retry is not None:
            self.on_retry(error, attempt)
        else:
            logger.warning(
                "retry %d/%d of %s after %s: %s",
                attempt,
                self.max_attempts - 1,
                name,
                type(error).__name__,
                error,
            )
        seconds = self.delay * self.backoff_factor ** (attempt - 1)
        seconds = seconds if self.max_delay is None else min(seconds, self.max_delay)
        return seconds * random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else seconds


def _retrying_async(function: Callable[..., Any], policy: _Policy) -> Callable[..., Any]:
    name = getattr(function, "__qualname__", repr(function))

    @functools.wraps(function)
    async def retrying(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, policy.max_attempts + 1):
            try:
                result = await function(*args, **kwargs)
            except policy.types as error:
                if attempt == policy.max_attempts:
                    raise
                await asyncio.sleep(policy.wait_before(attempt, error, name))
                continue
            _record(result, attempt - 1)
            return result
        raise AssertionError("unreachable")  # the loop returns or raises

    return retrying


def _retrying_sync(function: Callable[..., Any], policy: _Policy) -> Callable[..., Any]:
    name = getattr(function, "__qualname__", repr(function))

    @functools.wraps(function)
    def retrying(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, policy.max_attempts + 1):
            try:
                result = function(*args, **kwargs)
            except policy.types as error:
                if attempt == policy.max_attempts:
                    raise
                time.sleep(policy.wait_before(attempt, error, name))
                continue
            _record(result, attempt - 1)
            return result
        raise AssertionError("unreachable")

    return retrying


def retry(
    max_attempts: int = 3,
    delay: float = 0.25,
    backoff_factor: float = 2.0,
    exceptions: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
    on_retry: OnRetry | None = None,
    *,
    max_delay: float | None = None,
    jitter: float = 0.0,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Retry a sync or async function up to ``max_attempts`` times on ``exceptions`` (ART's ``art.retry``).

    The n-th retry waits ``delay * backoff_factor**(n-1)`` seconds (at most ``max_delay``, times a random
    factor in ``[1 - jitter, 1 + jitter]``). Other exceptions, and the last failure, propagate unchanged.
    ``on_retry(error, attempt)`` replaces the default warning log. When the result has a ``metrics`` dict
    (a ``Trajectory``), ``metrics["retries"]`` counts the retries it took, so ``model.log`` reports the mean.
    """
    types = _exception_types(exceptions)
    _check_numbers(max_attempts, delay, backoff_factor, max_delay)
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter={jitter} must be in [0, 1]")
    policy = _Policy(max_attempts, delay, backoff_factor, types, on_retry, max_delay, jitter)

    def decorator(function: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(function):
            return cast("Callable[P, R]", _retrying_async(function, policy))
        return cast("Callable[P, R]", _retrying_sync(function, policy))

    return decorator

"""``@limit_concurrency(n)``: at most ``n`` calls of an async function run at once, across all rollouts."""

from __future__ import annotations

import asyncio
import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def limit_concurrency(
    n: int,
    derive_key: Callable[..., Hashable] | None = None,
    *,
    timeout: float | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Let at most ``n`` calls of the decorated async function run at once (ART's ``limit_concurrency``).

    With ``derive_key(*args, **kwargs)`` each key gets its own ``n`` slots (e.g. one limit per API host).
    A call waits for a slot at most ``timeout`` seconds (None: as long as the running calls take), then
    raises ``TimeoutError``. Slots belong to the running event loop, so the decorator works across
    ``asyncio.run`` calls.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"limit_concurrency(n={n!r}): n must be an int of at least 1")
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout={timeout} must be positive, or None to wait as long as it takes")
    per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, asyncio.Semaphore]] = (
        weakref.WeakKeyDictionary()
    )

    def semaphore(key: Hashable) -> asyncio.Semaphore:
        semaphores = per_loop.setdefault(asyncio.get_running_loop(), {})
        if key not in semaphores:
            semaphores[key] = asyncio.Semaphore(n)
        return semaphores[key]

    def decorator(function: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        name = getattr(function, "__qualname__", repr(function))
        call = getattr(function, "__call__", None)  # noqa: B004  # an object whose __call__ is async
        if not (inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)):
            raise TypeError(
                f"limit_concurrency wraps async functions; {name} is not one: make it `async def` (run blocking "
                "work inside it with asyncio.to_thread)"
            )

        @functools.wraps(function)
        async def limited(*args: P.args, **kwargs: P.kwargs) -> R:
            key = derive_key(*args, **kwargs) if derive_key is not None else None
            slots = semaphore(key)
            try:
                await asyncio.wait_for(slots.acquire(), timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"{name} waited {timeout} s for one of its {n} concurrency slots"
                    + (f" (key {key!r})" if derive_key is not None else "")
                    + "; raise n or timeout, or find the calls that do not finish"
                ) from None
            try:
                return await function(*args, **kwargs)
            finally:
                slots.release()

        return limited

    return decorator

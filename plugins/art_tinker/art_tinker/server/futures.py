"""Request futures (``retrieve_future``) and per-model ``seq_id`` ordering."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal

from art_tinker.server.errors import NotFound, UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JsonResult:
    payload: dict[str, Any]


@dataclass(frozen=True)
class ProtoResult:
    payload: bytes


@dataclass(frozen=True)
class Failure:
    message: str
    category: Literal["user", "server"]


Outcome = JsonResult | ProtoResult | Failure


@dataclass
class FutureRecord:
    """One submitted request: done once ``outcome`` is set."""

    request_id: str
    kind: str
    created: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: Outcome | None = None
    finished_at: float | None = None


class FutureTable:
    """Every request's future, kept for ``retain_s`` after it finished (so a retried poll still finds it)."""

    def __init__(self, *, retain_s: float = 1800.0) -> None:
        self._records: dict[str, FutureRecord] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._retain_s = retain_s

    def submit(self, kind: str, work: Awaitable[Outcome]) -> str:
        """Start ``work`` in the background; return the new request id at once."""
        record = FutureRecord(request_id=f"req-{uuid.uuid4().hex}", kind=kind)
        self._records[record.request_id] = record
        task = asyncio.create_task(self._run(record, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record.request_id

    async def _run(self, record: FutureRecord, work: Awaitable[Outcome]) -> None:
        try:
            outcome = await work
        except UserError as error:
            outcome = Failure(str(error), "user")
        except Exception as error:  # any engine failure must reach the client, not vanish in a task
            logger.error("%s %s failed:\n%s", record.kind, record.request_id, traceback.format_exc())
            outcome = Failure(f"{type(error).__name__}: {error}", "server")
        record.outcome = outcome
        record.finished_at = time.monotonic()
        record.done.set()

    async def wait(self, request_id: str, timeout_s: float) -> Outcome | None:
        """The outcome, or None if the request is still running after ``timeout_s`` (long poll)."""
        record = self._records.get(request_id)
        if record is None:
            raise NotFound(f"request_id {request_id[:100]!r} is unknown (expired, or never submitted here)")
        try:
            await asyncio.wait_for(record.done.wait(), timeout_s)
        except TimeoutError:
            return None
        return record.outcome

    def prune(self) -> None:
        """Forget futures that finished more than ``retain_s`` ago."""
        now = time.monotonic()
        stale = [
            rid
            for rid, rec in self._records.items()
            if rec.finished_at is not None and now - rec.finished_at > self._retain_s
        ]
        for rid in stale:
            del self._records[rid]

    async def drain(self) -> None:
        """Cancel running work (server shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class SeqGate:
    """Runs one model's requests one at a time in ``seq_id`` order.

    A request whose lower ``seq_id`` never arrives (refused at submission) runs after ``gap_wait_s`` anyway, so a
    refused request cannot stall the model.
    """

    def __init__(self, *, next_seq: int = 0, gap_wait_s: float = 2.0) -> None:
        self._next = next_seq
        self._waiting: set[int] = set()
        self._running = False
        self._cond = asyncio.Condition()
        self._gap_wait_s = gap_wait_s

    async def run(self, seq_id: int, work: Awaitable[Outcome]) -> Outcome:
        """Wait for ``seq_id``'s turn, run ``work``, then let the next one go."""
        loop = asyncio.get_running_loop()
        async with self._cond:
            self._waiting.add(seq_id)
            deadline = loop.time() + self._gap_wait_s
            while self._running or not (
                seq_id <= self._next or (seq_id == min(self._waiting) and loop.time() >= deadline)
            ):
                remaining = deadline - loop.time()
                if remaining <= 0 or self._running:
                    await self._cond.wait()  # only a finishing request can change anything now
                    continue
                try:
                    await asyncio.wait_for(self._cond.wait(), remaining)
                except TimeoutError:
                    pass
            self._waiting.discard(seq_id)
            self._running = True
        try:
            return await work
        finally:
            async with self._cond:
                self._running = False
                self._next = max(self._next, seq_id + 1)
                self._cond.notify_all()

"""Continuous batching for the transformers engine: one worker thread runs every model's ``DecodeBatch``.

Requests are queued from any event loop; the worker admits them between decoding steps and settles each
request's future on its own loop when all of its ``n`` rows are done.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from art_local.inference.engine import Completion
from art_local.inference.sampling import DecodeBatch, Row, Vocab
from art_local.openmp import release_openmp_workers

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def set_thread_count_here_only(count: int) -> None:
    """Give the calling thread ``count`` torch threads without changing what threads started later get.

    ``torch.set_num_threads`` also sets the count every thread started afterwards inherits (the trainer's
    ``asyncio.to_thread`` workers among them); a short-lived helper thread puts that default back.
    """
    inherited = torch.get_num_threads()  # also initialises this thread, so the default cannot reach it later
    torch.set_num_threads(count)
    restore = threading.Thread(target=torch.set_num_threads, args=(inherited,), name="art-restore-threads")
    restore.start()
    restore.join()


@dataclass
class Job:
    """One request: ``len(rows)`` sequences (its ``n``) whose completions settle one future.

    ``release`` runs once, from the worker, when none of the job's rows is queued or decoding any more (also
    when its requester stopped waiting), so the engine knows when ``module`` is free. ``abandoned`` is set by
    the requester when it stops waiting (client gone, timeout): the worker then drops the job's rows, queued or
    decoding, at the next step.
    """

    module: PreTrainedModel
    vocab: Vocab
    rows: list[Row]
    future: asyncio.Future[list[Completion]]
    loop: asyncio.AbstractEventLoop
    done: dict[int, Completion] = field(default_factory=dict)
    release: Callable[[], None] | None = None
    abandoned: bool = False

    @property
    def given_up(self) -> bool:
        """True once nobody waits for the result (set from the requester's thread, read by the worker)."""
        return self.abandoned or self.future.cancelled()


class EngineFailure(RuntimeError):
    """The batch worker died or stalled: every pending and later request fails with this, naming the cause."""


def settle(job: Job, result: list[Completion] | BaseException) -> None:
    """Resolve ``job``'s future on its own event loop and release its module (callable from any thread)."""

    def apply() -> None:
        if job.future.done():
            return
        if isinstance(result, asyncio.CancelledError):  # nobody waits: no "exception never retrieved"
            job.future.cancel()
        elif isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    release, job.release = job.release, None
    if release is not None:
        release()
    try:
        job.loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the requester's loop is closed: nobody is waiting
        pass


class BatchWorker:
    """One thread that runs every model's ``DecodeBatch``, admitting new requests between decoding steps.

    When nothing runs, the first request waits ``window_s`` for company (sliding, at most 20 windows); while a
    batch runs, requests that arrived join it at the next step (continuous batching). Batches of different
    modules (steps) take turns step by step, so no step's requests starve. Requests beyond ``max_rows`` wait in
    ``_pending`` and are admitted as rows finish; the worker only sleeps on its queue when nothing is pending.

    Crash, never hang: if the thread dies, every pending request fails with an ``EngineFailure`` naming the
    cause, and so does every later ``submit``; ``check`` also fails once the worker has had work but made no
    progress for ``stall_timeout_s`` (a step stuck in a kernel), which the engine polls while requests wait.
    """

    def __init__(
        self, window_s: float, max_rows: int, cpu_threads: int | None = None, stall_timeout_s: float = 300.0
    ) -> None:
        self._window_s, self._max_rows, self._cpu_threads = window_s, max_rows, cpu_threads
        self._stall_timeout_s = stall_timeout_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending: list[Job] = []
        self._batches: dict[int, DecodeBatch] = {}
        self._lock = threading.Lock()
        self._live = 0  # submitted jobs not settled yet (queued, pending or decoding)
        self._progress_at = time.monotonic()  # last time the loop went round (idle waits count)
        self.failure: EngineFailure | None = None
        self.batches_run = 0  # prefills (groups of requests admitted together), for tests and benchmarks
        self.steps_run = 0
        self.rows_dropped = 0  # rows of abandoned requests dropped before they finished
        self._thread = threading.Thread(target=self._run, daemon=True, name="art-hf-batcher")
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; its future is settled from the worker thread. Raises the worker's failure, if any."""
        self.check()
        release = job.release

        def release_and_count() -> None:
            with self._lock:
                self._live -= 1
            if release is not None:
                release()

        job.release = release_and_count
        with self._lock:
            if not self._live:  # an idle worker's last round may be long ago: the stall clock starts now
                self._progress_at = time.monotonic()
            self._live += 1
        self._queue.put(job)

    def live_jobs(self) -> int:
        """Requests submitted and not answered yet (queued, waiting for room, or decoding)."""
        with self._lock:
            return self._live

    def check(self) -> None:
        """Raise ``EngineFailure`` if the worker died, or has had work without progress for ``stall_timeout_s``."""
        if self.failure is None and not self._thread.is_alive() and self._live:
            self.failure = EngineFailure("the inference worker thread has stopped; restart the backend")
        stalled_s = time.monotonic() - self._progress_at
        if self.failure is None and self._live and stalled_s > self._stall_timeout_s:
            self.failure = EngineFailure(
                f"the inference worker has made no progress for {stalled_s:.0f} s with "
                f"{self._live} request(s) waiting (a decoding step is stuck); restart the backend, or raise "
                "HFEngineConfig.stall_timeout_s if single steps legitimately take this long"
            )
        if self.failure is not None:
            raise self.failure

    def close(self, timeout_s: float = 30.0) -> None:
        """Fail queued and running jobs, and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _take(self, block: bool) -> bool:
        """Move queued jobs to ``_pending``; False once ``close`` was called."""
        try:
            job = self._queue.get(block=block)
        except queue.Empty:
            return True
        cap = time.monotonic() + 20 * self._window_s
        while job is not None:
            self._pending.append(job)
            wait = min(self._window_s, cap - time.monotonic()) if block else 0.0
            try:
                job = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                return True
        return False

    def _admit(self) -> None:
        waiting: list[Job] = []
        groups: dict[int, list[Job]] = {}
        for job in self._pending:
            if job.given_up:
                settle(job, asyncio.CancelledError())  # nobody waits; this releases the module
                continue
            batch = self._batches.get(id(job.module))
            used = (len(batch) if batch else 0) + sum(len(j.rows) for j in groups.get(id(job.module), []))
            joinable = batch is None or not len(batch) or batch.joinable
            if joinable and (used == 0 or used + len(job.rows) <= self._max_rows):
                groups.setdefault(id(job.module), []).append(job)
            else:
                waiting.append(job)
        self._pending = waiting
        for key, jobs in groups.items():
            batch = self._batches.get(key)
            if batch is None:  # built only when needed: it inspects the model (DecodeStep.of)
                batch = self._batches[key] = DecodeBatch(jobs[0].module, jobs[0].vocab)
            rows = [row for job in jobs for row in job.rows]
            tickets = [(job, i) for job in jobs for i in range(len(job.rows))]
            try:
                batch.admit(rows, tickets)
            except Exception as exc:
                self._fail(jobs, exc)
                continue
            self.batches_run += 1

    def _drop_abandoned(self, batch: DecodeBatch) -> None:
        """Remove the rows of requests nobody waits for any more, and settle those requests."""
        tickets = cast(list[tuple[Job, int]], batch.tickets)
        keep = [i for i, (job, _) in enumerate(tickets) if not job.given_up]
        if len(keep) == len(tickets):
            return
        gone = {id(job): job for job, _ in tickets if job.given_up}
        self.rows_dropped += len(tickets) - len(keep)
        batch.keep_rows(keep)
        for job in gone.values():
            settle(job, asyncio.CancelledError())

    def _step(self, key: int, batch: DecodeBatch) -> None:
        try:
            finished = batch.step()
        except Exception as exc:  # never kill the worker: fail this batch's requests with the cause
            self._fail(
                list({id(job): job for job, _ in cast(list[tuple[Job, int]], batch.tickets)}.values()), exc
            )
            del self._batches[key]
            return
        self.steps_run += 1
        for ticket, completion in finished:
            job, index = cast(tuple[Job, int], ticket)
            job.done[index] = completion
            if len(job.done) == len(job.rows):
                settle(job, [job.done[i] for i in range(len(job.rows))])

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        for job in jobs:
            settle(job, RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _run(self) -> None:
        error: BaseException = RuntimeError("the inference engine was closed before this request finished")
        try:
            self._loop()
        except BaseException as exc:  # anything that escapes the loop fails every request with its cause
            error = self.failure = EngineFailure(
                f"the inference worker crashed: {type(exc).__name__}: {exc}; restart the backend"
            )
            raise
        finally:
            self._settle_all(error)

    def _loop(self) -> None:
        if self._cpu_threads is not None:
            set_thread_count_here_only(self._cpu_threads)
        running = True
        while running:
            self._progress_at = time.monotonic()
            idle = not self._batches and not self._pending
            if idle:
                release_openmp_workers()  # let whichever thread computes next run un-throttled
            running = self._take(block=idle)
            self._progress_at = time.monotonic()
            self._admit()
            for key, batch in list(self._batches.items()):
                self._drop_abandoned(batch)
                if len(batch):
                    self._step(key, batch)
                if not len(batch):
                    self._batches.pop(key, None)  # drop the module reference: old steps can be freed

    def _settle_all(self, error: BaseException) -> None:
        for batch in self._batches.values():
            for job in {id(j): j for j, _ in cast(list[tuple[Job, int]], batch.tickets)}.values():
                settle(job, error)
        self._batches.clear()
        for job in self._pending:
            settle(job, error)
        self._pending = []
        while not self._queue.empty():
            left = self._queue.get_nowait()
            if left is not None:
                settle(left, error)

"""Running training jobs: one queue and one worker per model, so a model's jobs run one at a time, in order.

A job's life is written to the store as events: ``training_started``, then after ``train()`` returns one
``gradient_step`` per optimizer step the backend reports (``data/step_num_gradient_steps``, default 1; each
carries the call's metrics) and ``training_ended {step, metrics}``, committed together with the checkpoint
record; or ``training_failed {error_message}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

from art_core.results import TrainResult
from art_core.sft import SFTOptions
from art_core.trajectories import Trajectory, TrajectoryGroup
from art_serverless.server.host import BackendHost
from art_serverless.server.store import JobRow, ModelRow, Store

logger = logging.getLogger("art_serverless.server")
T = TypeVar("T")
SHUTDOWN_MESSAGE = (
    "the server shut down while job {job_id} was running; submit the same trajectory groups again"
)
# What ``training_started`` announces: a backend's train() makes one optimizer step per call unless it says
# otherwise in its metrics, and the server only learns that when train() returns.
EXPECTED_GRADIENT_STEPS = 1


def gradient_steps(result: TrainResult) -> int:
    """How many optimizer steps the call made: ``data/step_num_gradient_steps`` (0 for a batch with nothing
    to train) when the backend reports it, else 1."""
    count = result.metrics.get("data/step_num_gradient_steps", 1.0)
    return int(count) if isinstance(count, (int, float)) and math.isfinite(count) and count >= 0 else 1


def describe(error: BaseException) -> str:
    """The message a client sees for a failed job: the exception type and text, with its cause."""
    message = f"{type(error).__name__}: {error}"
    cause = error.__cause__
    if cause is not None:
        message += f" (caused by {type(cause).__name__}: {cause})"
    return message


async def _db(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


class JobRunner:
    """Per-model FIFO queues of job ids, each drained by one worker task on the server's loop."""

    def __init__(self, store: Store, host: BackendHost) -> None:
        self._store = store
        self._host = host
        self._queues: dict[str, asyncio.Queue[JobRow]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def model_lock(self, model_id: str) -> asyncio.Lock:
        """Held while a job of the model runs; checkpoint deletion takes it too, so it never races a new step."""
        return self._locks.setdefault(model_id, asyncio.Lock())

    def submit(self, job: JobRow) -> None:
        """Queue ``job`` behind the model's earlier jobs."""
        queue = self._queues.get(job.model_id)
        if queue is None:
            queue = self._queues[job.model_id] = asyncio.Queue()
            self._workers[job.model_id] = asyncio.create_task(self._work(queue), name=f"jobs-{job.model_id}")
        queue.put_nowait(job)

    async def _work(self, queue: asyncio.Queue[JobRow]) -> None:
        while True:
            job = await queue.get()
            try:
                async with self.model_lock(job.model_id):
                    await self._run(job)
            finally:
                queue.task_done()

    async def _run(self, job: JobRow) -> None:
        try:
            request = json.loads(job.request)
            row = await _db(self._store.get_model, job.model_id)
            if await _db(self._store.note_backend_step, row.id, await self._host.step(row)):
                logger.warning(
                    "model %s: recorded a checkpoint the store had missed before job %s", row.id, job.id
                )
            if request.get("kind") == "sft":
                result = await self._run_sft(job, row, request)
            else:
                groups = [TrajectoryGroup.model_validate(group) for group in request["trajectory_groups"]]
                await _db(self._store.start_job, job.id, EXPECTED_GRADIENT_STEPS)
                result = await self._host.train(row, groups, request["options"])
            await _db(
                self._store.finish_job, job.id, row.id, result.step, result.metrics, gradient_steps(result)
            )
        except asyncio.CancelledError:
            self._store.fail_job(job.id, SHUTDOWN_MESSAGE.format(job_id=job.id))
            raise
        except Exception as error:
            logger.exception("training job %s failed", job.id)
            await _db(self._store.fail_job, job.id, describe(error))

    async def _run_sft(self, job: JobRow, row: ModelRow, request: dict[str, Any]) -> TrainResult:
        """A ``train_sft()`` job: ``training_started`` announces its planned optimizer steps."""
        trajectories = [Trajectory.model_validate(item) for item in request["trajectories"]]
        options = request["options"]
        planned = len(SFTOptions(**options).plan(len(trajectories)))
        await _db(self._store.start_job, job.id, planned)
        return await self._host.train_sft(row, trajectories, options)

    async def join(self, model_id: str) -> None:
        """Wait until the model's queue is empty (tests, graceful drains)."""
        queue = self._queues.get(model_id)
        if queue is not None:
            await queue.join()

    async def close(self) -> None:
        """Cancel every worker; a running job is recorded as failed."""
        workers = list(self._workers.values())
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers.clear()
        self._queues.clear()

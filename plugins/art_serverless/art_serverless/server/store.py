"""The server's durable state: models, jobs, events and checkpoint records in one sqlite file (WAL).

Every change is one transaction committed with ``synchronous=FULL`` before the HTTP answer goes out, so what
the server acknowledged survives a crash. One connection, guarded by a lock, serves every thread.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1
JobStatus = Literal["queued", "running", "succeeded", "failed"]
RESTART_MESSAGE = (
    "the server stopped while job {job_id} was running, so its result was lost; nothing was saved for it. "
    "Submit the same trajectory groups again"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, entity TEXT NOT NULL, project TEXT NOT NULL, name TEXT NOT NULL,
    base_model TEXT NOT NULL, run_id TEXT, created_at REAL NOT NULL, UNIQUE (entity, project, name));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, model_id TEXT NOT NULL REFERENCES models(id), status TEXT NOT NULL
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed')), request TEXT NOT NULL,
    created_at REAL NOT NULL, finished_at REAL);
CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs (model_id, status);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL REFERENCES jobs(id), type TEXT NOT NULL,
    data TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, model_id TEXT NOT NULL REFERENCES models(id), step INTEGER NOT NULL,
    metrics TEXT NOT NULL, created_at REAL NOT NULL, UNIQUE (model_id, step));
"""


class NotFoundError(LookupError):
    """A model, job or checkpoint id the store does not know."""


class ConflictError(ValueError):
    """The request contradicts what is stored (a model that exists, a model with running jobs)."""


@dataclass(frozen=True)
class ModelRow:
    """A registered model."""

    id: str
    entity: str
    project: str
    name: str
    base_model: str
    run_id: str | None

    def public(self) -> dict[str, Any]:
        """The wire record."""
        return {k: getattr(self, k) for k in ("id", "entity", "project", "name", "base_model", "run_id")}


@dataclass(frozen=True)
class JobRow:
    """A training job and the request it was submitted with (JSON text)."""

    id: str
    model_id: str
    status: JobStatus
    request: str


@dataclass(frozen=True)
class EventRow:
    """One job event; ``id`` ascends across the whole store."""

    id: int
    type: str
    data: dict[str, Any]

    def public(self) -> dict[str, Any]:
        """The wire record (ids are strings on the wire)."""
        return {"id": str(self.id), "type": self.type, "data": self.data}


@dataclass(frozen=True)
class CheckpointRow:
    """A checkpoint the model keeps."""

    id: str
    step: int
    metrics: dict[str, float]

    def public(self) -> dict[str, Any]:
        """The wire record."""
        return {"id": self.id, "step": self.step, "metrics": self.metrics}


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Numeric, finite values only (JSON has no NaN)."""
    return {
        str(key): float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


class Store:
    """The sqlite file and the lock around its one connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{path} has schema version {version}, newer than {SCHEMA_VERSION}; upgrade art-serverless"
            )
        with self._transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- models ----------------------------------------------------------------------------------------------

    def create_model(
        self, entity: str, project: str, name: str, base_model: str, *, return_existing: bool
    ) -> tuple[ModelRow, bool]:
        """Create the model, or return the existing one when ``return_existing``; True when it was created."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, entity, project, name, base_model, run_id FROM models "
                "WHERE entity = ? AND project = ? AND name = ?",
                (entity, project, name),
            ).fetchone()
            if row is not None:
                existing = ModelRow(*row)
                label = f"{entity}/{project}/{name}"
                if not return_existing:
                    raise ConflictError(
                        f"model {label} already exists (id {existing.id}); send return_existing=true"
                    )
                if existing.base_model != base_model:
                    raise ConflictError(
                        f"model {label} exists with base_model {existing.base_model!r}, not {base_model!r}; "
                        "use another name"
                    )
                return existing, False
            created = ModelRow(_new_id("mdl"), entity, project, name, base_model, None)
            db.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                (created.id, entity, project, name, base_model, None, time.time()),
            )
            return created, True

    def get_model(self, model_id: str) -> ModelRow:
        """The model with this id (NotFoundError otherwise)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, entity, project, name, base_model, run_id FROM models WHERE id = ?", (model_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no model with id {model_id!r}; create it with POST /preview/models")
        return ModelRow(*row)

    def find_model(self, entity: str, project: str, name: str) -> ModelRow:
        """The model with these names (NotFoundError otherwise)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, entity, project, name, base_model, run_id FROM models "
                "WHERE entity = ? AND project = ? AND name = ?",
                (entity, project, name),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no model {entity}/{project}/{name} on this server; register it first")
        return ModelRow(*row)

    def delete_model(self, model_id: str) -> None:
        """Forget the model, its jobs, events and checkpoint records (ConflictError while a job is pending)."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM models WHERE id = ?", (model_id,)).fetchone() is None:
                raise NotFoundError(f"no model with id {model_id!r}")
            pending = db.execute(
                "SELECT id FROM jobs WHERE model_id = ? AND status IN ('queued', 'running')", (model_id,)
            ).fetchall()
            if pending:
                raise ConflictError(
                    f"model {model_id} has unfinished jobs {[r[0] for r in pending]}; wait for them"
                )
            db.execute(
                "DELETE FROM events WHERE job_id IN (SELECT id FROM jobs WHERE model_id = ?)", (model_id,)
            )
            db.execute("DELETE FROM jobs WHERE model_id = ?", (model_id,))
            db.execute("DELETE FROM checkpoints WHERE model_id = ?", (model_id,))
            db.execute("DELETE FROM models WHERE id = ?", (model_id,))

    def models_with_steps(self) -> list[tuple[ModelRow, list[int]]]:
        """Every model with its kept checkpoint steps (for ``/v1/models``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, entity, project, name, base_model, run_id FROM models ORDER BY rowid"
            ).fetchall()
            steps = self._db.execute("SELECT model_id, step FROM checkpoints ORDER BY step").fetchall()
        by_model: dict[str, list[int]] = {}
        for model_id, step in steps:
            by_model.setdefault(model_id, []).append(step)
        return [(ModelRow(*row), by_model.get(row[0], [])) for row in rows]

    # -- jobs and events -------------------------------------------------------------------------------------

    def create_job(self, model_id: str, request: Mapping[str, Any]) -> JobRow:
        """Record a queued job with its full request, so a restart can still run it."""
        job = JobRow(_new_id("job"), model_id, "queued", _dumps(request))
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, model_id, status, request, created_at) VALUES (?, ?, 'queued', ?, ?)",
                (job.id, model_id, job.request, time.time()),
            )
        return job

    def get_job(self, job_id: str) -> JobRow:
        """The job with this id (NotFoundError otherwise)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, model_id, status, request FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no training job with id {job_id!r}")
        return JobRow(*row)

    def _event(self, db: sqlite3.Connection, job_id: str, kind: str, data: Mapping[str, Any]) -> None:
        db.execute(
            "INSERT INTO events (job_id, type, data, created_at) VALUES (?, ?, ?, ?)",
            (job_id, kind, _dumps(dict(data)), time.time()),
        )

    def start_job(self, job_id: str, num_sequences: int) -> None:
        """queued → running, with its ``training_started`` event."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = 'running' WHERE id = ? AND status = 'queued'", (job_id,))
            self._event(db, job_id, "training_started", {"num_sequences": num_sequences})

    def finish_job(
        self, job_id: str, model_id: str, step: int, metrics: Mapping[str, Any], gradient_steps: int
    ) -> None:
        """One transaction: a ``gradient_step`` event per optimizer step, the checkpoint record, ``training_ended``.

        ``training_ended`` carries ``{step, metrics}`` too (an extension that clients unaware of it ignore), so the
        metrics of a call that made no optimizer step still reach the client.
        """
        metrics = finite_metrics(metrics)
        with self._transaction() as db:
            for _ in range(gradient_steps):
                self._event(db, job_id, "gradient_step", metrics)
            db.execute(
                "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (model_id, step) DO UPDATE SET metrics = excluded.metrics",
                (_new_id("ckpt"), model_id, step, _dumps(metrics), time.time()),
            )
            self._event(db, job_id, "training_ended", {"step": step, "metrics": metrics})
            db.execute(
                "UPDATE jobs SET status = 'succeeded', finished_at = ? WHERE id = ?", (time.time(), job_id)
            )

    def fail_job(self, job_id: str, message: str) -> None:
        """queued/running → failed, with its ``training_failed {error_message}`` event (no-op once finished)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ? WHERE id = ? AND status IN ('queued', 'running')",
                (time.time(), job_id),
            )
            if cursor.rowcount == 1:
                self._event(db, job_id, "training_failed", {"error_message": message})

    def list_events(self, job_id: str, after: int | None, limit: int) -> tuple[list[EventRow], bool]:
        """Events of the job with id > ``after``, ascending; True when more follow."""
        self.get_job(job_id)
        with self._lock:
            rows = self._db.execute(
                "SELECT id, type, data FROM events WHERE job_id = ? AND id > ? ORDER BY id LIMIT ?",
                (job_id, -1 if after is None else after, limit + 1),
            ).fetchall()
        events = [EventRow(row[0], row[1], json.loads(row[2])) for row in rows[:limit]]
        return events, len(rows) > limit

    def recover(self) -> list[JobRow]:
        """After a restart: fail the jobs that were running; return the queued ones, oldest first, to run."""
        with self._lock:
            running = [
                row[0] for row in self._db.execute("SELECT id FROM jobs WHERE status = 'running'").fetchall()
            ]
        for job_id in running:
            self.fail_job(job_id, RESTART_MESSAGE.format(job_id=job_id))
        with self._lock:
            rows = self._db.execute(
                "SELECT id, model_id, status, request FROM jobs WHERE status = 'queued' ORDER BY rowid"
            ).fetchall()
        return [JobRow(*row) for row in rows]

    # -- checkpoints -----------------------------------------------------------------------------------------

    def list_checkpoints(
        self, model_id: str, *, after: str | None, limit: int, order: Literal["asc", "desc"]
    ) -> tuple[list[CheckpointRow], bool]:
        """A page of the model's checkpoints by step; ``after`` is the id of the last one already seen."""
        self.get_model(model_id)
        direction, compare = ("ASC", ">") if order == "asc" else ("DESC", "<")
        with self._lock:
            bound: int | None = None
            if after is not None:
                found = self._db.execute(
                    "SELECT step FROM checkpoints WHERE id = ? AND model_id = ?", (after, model_id)
                ).fetchone()
                if found is None:
                    raise NotFoundError(
                        f"no checkpoint with id {after!r} for model {model_id}; pass an id from a page"
                    )
                bound = found[0]
            where = "model_id = ?" + ("" if bound is None else f" AND step {compare} ?")
            params: tuple[Any, ...] = (model_id,) if bound is None else (model_id, bound)
            rows = self._db.execute(
                f"SELECT id, step, metrics FROM checkpoints WHERE {where} ORDER BY step {direction} LIMIT ?",
                (*params, limit + 1),
            ).fetchall()
        checkpoints = [CheckpointRow(row[0], row[1], json.loads(row[2])) for row in rows[:limit]]
        return checkpoints, len(rows) > limit

    def checkpoint_steps(self, model_id: str) -> list[int]:
        """Every kept step of the model, ascending."""
        with self._lock:
            rows = self._db.execute(
                "SELECT step FROM checkpoints WHERE model_id = ? ORDER BY step", (model_id,)
            ).fetchall()
        return [row[0] for row in rows]

    def note_backend_step(self, model_id: str, step: int) -> bool:
        """Record a checkpoint the backend has but the store missed (a step finished while the server was going
        down), when it is newer than every recorded one; True when one was added. Its metrics are unknown."""
        with self._transaction() as db:
            latest = db.execute(
                "SELECT MAX(step) FROM checkpoints WHERE model_id = ?", (model_id,)
            ).fetchone()[0]
            if step <= 0 or (latest is not None and step <= latest):
                return False
            db.execute(
                "INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                (_new_id("ckpt"), model_id, step, "{}", time.time()),
            )
            return True

    def delete_checkpoint_records(self, model_id: str, steps: list[int]) -> int:
        """Drop the records of these steps; the number dropped."""
        with self._transaction() as db:
            cursor = db.executemany(
                "DELETE FROM checkpoints WHERE model_id = ? AND step = ?", [(model_id, s) for s in steps]
            )
            return cursor.rowcount

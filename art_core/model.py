"""``Model`` and ``TrainableModel``: names, the backend link, the OpenAI client, and ``log()``."""

from __future__ import annotations

import asyncio
import difflib
import os
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
from typing_extensions import deprecated

from art_core import history
from art_core.model_checks import (
    check_metrics,
    check_step,
    coerce_groups,
    known_fields,
    validate_model_name,
    validate_name,
    validate_split,
)
from art_core.trajectories import TrajectoryGroup

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from art_core import dev
    from art_core.backend import Backend
    from art_core.migration import TrainConfig
    from art_core.reporters import Reporter
    from art_core.results import TrainResult


def _default_request_timeout_s() -> float:
    raw = os.environ.get("ART_REQUEST_TIMEOUT_S", "180")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"ART_REQUEST_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"ART_REQUEST_TIMEOUT_S={raw!r}; give a number of seconds > 0")
    return value


DEFAULT_REQUEST_TIMEOUT_S = _default_request_timeout_s()  # each request of model.openai_client()
DEFAULT_MAX_RETRIES = 1


def _refuse_a_misspelled_metric(metric: str, records: list[dict[str, Any]], path: Path) -> None:
    """Raise ValueError when ``metric`` is absent from the history but close to a key that is in it."""
    keys = sorted({key for record in records for key in record if key != "step"})
    close = difflib.get_close_matches(metric, keys, n=1, cutoff=0.8)
    if close:
        raise ValueError(
            f"no {metric!r} in {path}: did you mean {close[0]!r}? Nothing was deleted (with a metric that is "
            "not logged, only the latest step would be kept)"
        )


class Model(pydantic.BaseModel):
    """A model that rollouts call and whose trajectories and metrics get logged.

    Unknown keyword arguments are a ``TypeError`` naming the closest field (a typo never passes silently), and
    OpenPipe ART's ``_internal_config`` is refused with, for each key, the setting that replaces it here.
    """

    name: str
    project: str
    entity: str | None = None
    id: str | None = None
    config: Any = None
    base_path: str = ".art"
    report_metrics: list[str] | None = None
    inference_api_key: str | None = None
    inference_base_url: str | None = None
    inference_model_name: str | None = None
    trainable: bool = False

    _backend: Backend | None = pydantic.PrivateAttr(default=None)
    _openai_client: AsyncOpenAI | None = pydantic.PrivateAttr(default=None)
    _openai_client_key: tuple[str, str, float, int] | None = pydantic.PrivateAttr(default=None)
    _reporters: dict[str, Reporter] | None = pydantic.PrivateAttr(default=None)
    _reporters_lock: threading.Lock = pydantic.PrivateAttr(default_factory=threading.Lock)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.model_config.get("extra") != "allow":
            return known_fields(cls, data)
        return data

    @pydantic.field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return validate_model_name(value)

    @pydantic.field_validator("project")
    @classmethod
    def _valid_project(cls, value: str) -> str:
        return validate_name(value, "project name")

    # -- backend ---------------------------------------------------------------------------------------------

    def backend(self) -> Backend:
        """The backend this model is registered with."""
        if self._backend is None:
            raise ValueError(
                f"model {self.name!r} is not registered; call `await model.register(backend)` first"
            )
        return self._backend

    async def register(self, backend: Backend) -> None:
        """Attach this model to ``backend`` (idempotent for the same backend)."""
        if self._backend is not None and self._backend is not backend:
            raise ValueError(
                f"model {self.name!r} is already registered with {type(self._backend).__name__}; "
                "create a new Model object to use another backend"
            )
        await backend.register(self)
        self._backend = backend

    def openai_client(
        self, *, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES
    ) -> AsyncOpenAI:
        """An ``AsyncOpenAI`` client for this model's inference endpoint (one per settings, reused).

        ``timeout_s`` bounds each request (default 180 s, ``ART_REQUEST_TIMEOUT_S`` overrides it) and
        ``max_retries`` retries connection errors, 429s and 5xx once: a rollout against a stuck server fails
        within minutes instead of the OpenAI client's 600 s x 3. Set ``timeout_s`` above your slowest
        legitimate request (long completions of a large model on CPU).
        """
        if not timeout_s > 0 or max_retries < 0:
            raise ValueError(
                f"timeout_s={timeout_s!r}, max_retries={max_retries!r}: give seconds > 0 and retries >= 0"
            )
        if self.inference_base_url is None or self.inference_api_key is None:
            if self.trainable:
                raise ValueError(
                    f"model {self.name!r} has no endpoint yet; call `await model.register(backend)`"
                )
            raise ValueError("set inference_base_url and inference_api_key to get an OpenAI client")
        key = (self.inference_base_url, self.inference_api_key, timeout_s, max_retries)
        if self._openai_client is not None and self._openai_client_key == key:
            return self._openai_client
        from openai import AsyncOpenAI

        self._openai_client = AsyncOpenAI(
            base_url=self.inference_base_url,
            api_key=self.inference_api_key,
            timeout=timeout_s,
            max_retries=max_retries,
        )
        self._openai_client_key = key
        return self._openai_client

    def get_inference_name(self, step: int | None = None) -> str:
        """The ``model`` to send to the endpoint: the latest weights, or those of ``step``."""
        if self._backend is not None:
            return self._backend._model_inference_name(self, step=step)
        base = self.inference_model_name or self.name
        return base if step is None else f"{base}@{step}"

    async def get_step(self) -> int:
        """The model's training step (0 for a model that is not trained)."""
        return 0

    # -- logging ---------------------------------------------------------------------------------------------

    def output_dir(self) -> Path:
        """``{base_path}/{project}/models/{name}``: where trajectories, history and checkpoints live."""
        return Path(self.base_path) / self.project / "models" / self.name

    def _get_output_dir(self) -> str:
        return str(self.output_dir())

    def wandb_config(self) -> dict[str, Any]:
        return {"project": self.project, "name": self.name, "base_model": getattr(self, "base_model", None)}

    async def log(
        self,
        trajectory_groups: Iterable[TrajectoryGroup] | None = None,
        *,
        split: str = "train",
        metrics: Mapping[str, float] | None = None,
        step: int | None = None,
    ) -> None:
        """Add the groups to ``trajectories/{split}/{step:04d}.parquet``, append a ``history.jsonl`` line, report it.

        Logging a split and step that already has a file *appends* to it (the file is rewritten atomically with
        the old rows first), never replaces it: validation logged in chunks, or train and val logged by separate
        calls, keeps every row, and each step still has one file where ART's readers look for it. Each call adds
        its own history line, whose computed metrics cover that call's groups. Computed metrics (reward mean,
        within-group reward std dev, exception rate, per-metric means, group counts) are prefixed with the split;
        ``metrics`` you pass win over computed ones.
        """
        groups = None if trajectory_groups is None else coerce_groups(trajectory_groups)
        split = validate_split(split)
        extra = check_metrics(metrics)
        step = await self.get_step() if step is None else check_step(step)
        if groups is None and not extra:
            warnings.warn("model.log() called with nothing to log", RuntimeWarning, stacklevel=2)
            return
        values = {**(history.computed_metrics(groups, split) if groups is not None else {}), **extra}
        record = history.make_record(step, history.prefixed_metrics(values, split))
        await asyncio.to_thread(self._write_log, groups, split, step, record)
        self._report(record)

    def _writable_dir(self, directory: Path) -> Path:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(
                error.errno,
                f"cannot create {directory}: {error.strerror}; pass a writable base_path= to the Model",
            ) from error
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{directory} is not writable; pass a writable base_path= to the Model")
        return directory

    def _write_log(
        self, groups: list[TrajectoryGroup] | None, split: str, step: int, record: dict[str, Any]
    ) -> None:
        from art_core.trajectory_parquet import append_trajectory_groups, clean_trajectory_dirs

        output = self._writable_dir(self.output_dir())
        clean_trajectory_dirs(output / "trajectories")  # temp files of a log() that was killed
        history_path = output / "history.jsonl"
        try:  # open the history first: if it cannot be written, nothing else is
            fd = history.open_for_append(history_path)
        except OSError as error:
            raise OSError(error.errno, f"cannot append to {history_path}: {error.strerror}") from error
        try:
            if groups is not None:
                trajectories_dir = self._writable_dir(output / "trajectories" / split)
                append_trajectory_groups(groups, trajectories_dir / f"{step:04d}.parquet")
            history.append_line(fd, record)
        finally:
            os.close(fd)

    def _active_reporters(self) -> dict[str, Reporter]:
        with self._reporters_lock:
            if self._reporters is None:
                from art_core.plugins import get_reporter_factory

                names = self.report_metrics
                if names is None:
                    wanted = "WANDB_API_KEY" in os.environ or os.environ.get("WANDB_MODE") == "offline"
                    names = ["wandb"] if wanted else []
                self._reporters = {name: get_reporter_factory(name)(self) for name in names}
            return self._reporters

    def _report(self, record: dict[str, Any]) -> None:
        for reporter in self._active_reporters().values():
            reporter.report(record)

    def close_reporters(self) -> None:
        """Finish every reporter (e.g. the wandb run); the next ``log`` starts them again."""
        with self._reporters_lock:
            reporters, self._reporters = self._reporters or {}, None
        for reporter in reporters.values():
            reporter.close()

    def read_history(self) -> list[dict[str, Any]]:
        """Every record of this model's ``history.jsonl`` (corrupt lines skipped with a warning)."""
        return history.read_history(self.output_dir() / "history.jsonl")


class TrainableModel(Model):
    """A model trained by a backend from ``base_model`` (a hub id or a local directory)."""

    base_model: str
    trainable: bool = True

    async def register(self, backend: Backend) -> None:
        """Attach to ``backend`` and point ``openai_client()`` at its endpoint (idempotent)."""
        await super().register(backend)
        base_url, api_key = await backend._prepare_backend_for_training(self)
        if (base_url, api_key) != (self.inference_base_url, self.inference_api_key):
            self.inference_base_url, self.inference_api_key = base_url, api_key
            self._openai_client = None

    async def get_step(self) -> int:
        """The latest trained step according to the backend (0 before the first ``train()``)."""
        return await self.backend()._get_step(self)

    @deprecated(
        "model.train() is deprecated: call `await backend.train(model, groups, ...)` (options typed per "
        "backend), then `await model.log(groups, metrics=result.metrics, step=result.step)`",
        category=None,  # the run-time warning, with the exact replacement call, comes from train() itself
    )
    async def train(
        self,
        trajectory_groups: Iterable[TrajectoryGroup],
        config: TrainConfig | None = None,
        _config: dev.TrainConfig | None = None,
        verbose: bool = False,
    ) -> TrainResult:
        """Deprecated (ART's API): one ``backend.train`` step with the configs mapped onto its options, then log.

        Each field set on ``config`` and each ``_config`` key becomes the backend option of the same name; a key
        the backend has no option for is a ``TypeError`` listing the options it has. Afterwards the groups and the
        step's metrics are logged with ``model.log(groups, split="train", ...)`` at the new step, as ART 0.5 did.
        """
        from art_core import migration

        kwargs = migration.prepare_call(self.backend(), config, _config, verbose)
        return await migration.train_and_log(self, trajectory_groups, kwargs)

    async def delete_checkpoints(
        self, best_checkpoint_metric: str = "val/reward", *, higher_is_better: bool = True
    ) -> list[int]:
        """Delete every checkpoint but the latest and the best by ``best_checkpoint_metric``; return the kept steps.

        The whole history is read (every line, every key). Without a history or the metric only the latest is
        kept, with a warning: this never deletes everything. A metric that is absent but close to one the
        history has (a typo such as ``"val/rewad"``) is a ValueError and nothing is deleted: keeping only the
        latest would silently throw the best checkpoint away.
        """
        backend = self.backend()
        latest = await self.get_step()
        keep = {latest}
        path = self.output_dir() / "history.jsonl"
        try:
            records = history.read_history(path)
        except FileNotFoundError:
            warnings.warn(
                f"no history at {path}; keeping only the latest step {latest}", RuntimeWarning, stacklevel=2
            )
        else:
            best = history.best_step(records, best_checkpoint_metric, higher_is_better=higher_is_better)
            if best is None:
                _refuse_a_misspelled_metric(best_checkpoint_metric, records, path)
                warnings.warn(
                    f"no {best_checkpoint_metric!r} in {path}; keeping only the latest step {latest}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                keep.add(best)
        steps = sorted(keep)
        await backend._delete_checkpoint_files(self, steps)
        return steps

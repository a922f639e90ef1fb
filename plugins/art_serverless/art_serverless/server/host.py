"""The training backend behind the server, on its own thread and event loop.

A backend's ``train()`` may hold its event loop for the whole step (PyTorch work); running it on a separate loop
keeps the HTTP server answering event polls and inference meanwhile. Each served model becomes a
``TrainableModel`` of that backend named by its server id, so models that share a name in different
entities or projects never collide inside the backend.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from art_core.backend import TrainableBackend
from art_core.model import TrainableModel
from art_core.results import TrainResult
from art_core.sft import SFTBackend
from art_core.trajectories import Trajectory, TrajectoryGroup
from art_serverless.server.proxy import ModelNames
from art_serverless.server.store import ModelRow
from art_serverless.wire import EXPERIMENTAL_CONFIG_KEYS, ExperimentalConfig, artifact_name

T = TypeVar("T")


def serverless_defaults() -> dict[str, Any]:
    """The defaults ServerlessBackend.train() sends for every option of ``experimental_config``."""
    from art_serverless.backend import ServerlessBackend

    parameters = inspect.signature(ServerlessBackend.train).parameters
    return {key: parameters[key].default for key in EXPERIMENTAL_CONFIG_KEYS}


def keyword_options(train: Callable[..., Any]) -> frozenset[str]:
    """The keyword-only options a ``train()`` accepts (a ``**kwargs`` backend is refused: options must be typed)."""
    parameters = inspect.signature(train).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise TypeError(
            f"{train!r} takes **kwargs; the server needs a backend whose train() options are typed"
        )
    return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def train_options(
    config: ExperimentalConfig | None, accepted: frozenset[str], backend_name: str
) -> dict[str, Any]:
    """``experimental_config`` → ``train()`` keywords. An option the backend lacks is dropped when it holds the
    serverless default (clients send every key) and refused with ValueError otherwise."""
    given = config.options() if config is not None else {}
    defaults = serverless_defaults()
    options: dict[str, Any] = {}
    for key, value in given.items():
        if key in accepted:
            options[key] = value
        elif value != defaults[key]:
            raise ValueError(
                f"experimental_config.{key}={value!r} is not supported by the server's {backend_name!r} backend; "
                f"leave it at its default ({defaults[key]!r})"
            )
    return options


class BackendHost:
    """Owns the backend, its thread and loop, and the backend-side ``TrainableModel`` of each served model."""

    def __init__(self, factory: Callable[[], Any], *, base_path: Path, name: str) -> None:
        self.name = name
        self.base_path = base_path
        self._factory = factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._backend: TrainableBackend | None = None
        self._models: dict[str, TrainableModel] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}
        self.accepted_options: frozenset[str] = frozenset()

    def start(self, timeout: float = 300.0) -> None:
        """Create the backend on a new thread running its own event loop."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                self._backend = self._factory()
            except BaseException as error:
                failure.append(error)
                ready.set()
                loop.close()
                return
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name=f"art-serverless-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"backend {self.name!r} was not created within {timeout:g} s")
        if failure:
            raise RuntimeError(f"could not create backend {self.name!r}: {failure[0]}") from failure[0]
        backend = self._backend
        if not isinstance(backend, TrainableBackend):
            raise TypeError(
                f"backend {self.name!r} ({type(backend).__name__}) does not implement TrainableBackend"
            )
        self.accepted_options = keyword_options(backend.train)

    @property
    def backend(self) -> TrainableBackend:
        if self._backend is None:
            raise RuntimeError("the backend host is not started")
        return self._backend

    async def call(self, work: Callable[[TrainableBackend], Awaitable[T]], wait_s: float | None = None) -> T:
        """Run ``work(backend)`` on the backend's loop and wait for it here (cancelling it if we are cancelled)."""
        if self._loop is None:
            raise RuntimeError("the backend host is not started")
        backend = self.backend

        async def run() -> T:
            return await work(backend)

        future: Future[T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), wait_s)

    async def model(self, row: ModelRow) -> TrainableModel:
        """The backend-side model of ``row``, registered (and its endpoint prepared) on first use."""
        lock = self._model_locks.setdefault(row.id, asyncio.Lock())
        async with lock:
            if row.id not in self._models:
                model = TrainableModel(
                    name=row.id,
                    project=row.project,
                    base_model=row.base_model,
                    base_path=str(self.base_path),
                    report_metrics=[],
                )

                async def register(backend: TrainableBackend) -> None:
                    await model.register(backend)

                await self.call(register)
                self._models[row.id] = model
            return self._models[row.id]

    def forget(self, model_id: str) -> None:
        """Drop the cached backend-side model (after the model was deleted)."""
        self._models.pop(model_id, None)

    async def train(
        self, row: ModelRow, groups: list[TrajectoryGroup], options: Mapping[str, Any]
    ) -> TrainResult:
        """``backend.train(model, groups, **options)``."""
        model = await self.model(row)
        return await self.call(lambda backend: backend.train(model, groups, **options))

    async def train_sft(
        self, row: ModelRow, trajectories: list[Trajectory], options: Mapping[str, Any]
    ) -> TrainResult:
        """``backend.train_sft(model, trajectories, **options)`` (the route checked the backend has it)."""
        model = await self.model(row)

        async def work(backend: TrainableBackend) -> TrainResult:
            if not isinstance(backend, SFTBackend):
                raise TypeError(f"backend {self.name!r} ({type(backend).__name__}) has no train_sft()")
            return await backend.train_sft(model, trajectories, **options)

        return await self.call(work)

    async def step(self, row: ModelRow) -> int:
        """``backend._get_step(model)``."""
        model = await self.model(row)
        return await self.call(lambda backend: backend._get_step(model))

    async def delete_checkpoints(self, row: ModelRow, steps_to_keep: list[int]) -> None:
        """``backend._delete_checkpoint_files(model, steps_to_keep)``."""
        model = await self.model(row)
        await self.call(lambda backend: backend._delete_checkpoint_files(model, steps_to_keep))

    async def inference_target(
        self, row: ModelRow, step: int | None, steps: list[int]
    ) -> tuple[str, str, ModelNames]:
        """Where the backend serves ``row`` (base URL, key) and its names: the one for ``step`` and, for
        translating answers, those of the latest and of each kept step in ``steps``."""
        model = await self.model(row)
        if model.inference_base_url is None or model.inference_api_key is None:
            raise RuntimeError(f"backend {self.name!r} gave no inference endpoint for model {row.id}")
        backend = self.backend
        aliases = {
            backend._model_inference_name(model, known): artifact_name(
                row.entity, row.project, row.name, known
            )
            for known in [None, *steps]
        }
        names = ModelNames(
            upstream=backend._model_inference_name(model, step),
            public=artifact_name(row.entity, row.project, row.name, step),
            aliases=aliases,
        )
        return model.inference_base_url.rstrip("/"), model.inference_api_key, names

    async def close(self, wait_s: float = 60.0) -> None:
        """Close the backend, then stop its loop and thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            await self.call(lambda backend: backend.close(), wait_s=wait_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, wait_s)
            self._loop = None
            self._backend = None

"""The FastAPI app of the serverless-RL API (PROTOCOLS.md §1), over any installed training backend."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import pydantic
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from art_core.model import validate_name
from art_core.plugins import get_backend_class
from art_core.trajectories import TrajectoryGroup, check_groups
from art_serverless import wire
from art_serverless.server.guard import GuardMiddleware
from art_serverless.server.host import BackendHost, train_options
from art_serverless.server.jobs import JobRunner
from art_serverless.server.proxy import ModelNames, forward_chat, models_list
from art_serverless.server.store import ConflictError, NotFoundError, Store

logger = logging.getLogger("art_serverless.server")
T = TypeVar("T")
DATABASE_NAME = "serverless.sqlite3"


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs; ``backend_factory`` (tests, embedding) overrides ``backend`` by name."""

    data_dir: Path
    api_key: str
    backend: str = "local"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    backend_factory: Callable[[], Any] | None = None
    default_entity: str = "local"
    max_body_bytes: int = 256 * 2**20
    inference_timeout: float = 600.0

    def __post_init__(self) -> None:
        if len(self.api_key) < 8:
            raise ValueError("the server's API key must have at least 8 characters; use a random one")
        validate_name(self.default_entity, "default entity")


@dataclass
class ServerState:
    """What the routes share: the store, the backend host, the job runner and the inference proxy client."""

    config: ServerConfig
    store: Store
    host: BackendHost
    runner: JobRunner
    proxy: httpx.AsyncClient


class ApiError(Exception):
    """An error answer: HTTP ``status`` with a message naming the bad value and the fix."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _validation_message(errors: Any) -> str:
    parts = []
    for error in list(errors)[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.message, error.kind)

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, error: NotFoundError) -> JSONResponse:
        return _error(404, str(error), "not_found_error")

    @app.exception_handler(ConflictError)
    async def conflict(request: Request, error: ConflictError) -> JSONResponse:
        return _error(409, str(error), "conflict_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(error.errors()), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal server error: {type(error).__name__}: {error}", "server_error")


def state_of(request: Request) -> ServerState:
    """The server state of the app handling ``request``."""
    state: ServerState = request.app.state.art
    return state


async def _db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


def _backend_factory(config: ServerConfig) -> Callable[[], Any]:
    """Build the named backend; one that takes a ``path`` keeps its files under DATA_DIR/backend by default."""
    if config.backend_factory is not None:
        return config.backend_factory

    def build() -> Any:
        backend_class = get_backend_class(config.backend)
        options = dict(config.backend_options)
        if "path" not in options and "path" in inspect.signature(backend_class).parameters:
            options["path"] = str(config.data_dir / "backend")
        return backend_class(**options)

    return build


def parse_groups(raw_groups: list[dict[str, Any]]) -> list[TrajectoryGroup]:
    """Validate each group of a job body, naming the first bad one (ApiError 422)."""
    if not raw_groups:
        raise ApiError(422, "trajectory_groups is empty; send at least one group")
    groups = []
    for index, raw in enumerate(raw_groups):
        try:
            groups.append(TrajectoryGroup.model_validate(raw))
        except pydantic.ValidationError as error:
            raise ApiError(
                422, f"trajectory_groups[{index}] is invalid: {_validation_message(error.errors())}"
            ) from None
    try:
        return check_groups(groups)
    except (TypeError, ValueError) as error:
        raise ApiError(422, str(error)) from None


def create_app(config: ServerConfig, *, on_ready: Callable[[ServerState], None] | None = None) -> FastAPI:
    """The ASGI app; its lifespan opens the store, starts the backend and re-queues jobs left from a restart."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = Store(config.data_dir / DATABASE_NAME)
        host = BackendHost(
            _backend_factory(config), base_path=config.data_dir / "backend", name=config.backend
        )
        await asyncio.to_thread(host.start)
        runner = JobRunner(store, host)
        timeout = httpx.Timeout(config.inference_timeout, connect=10.0)
        async with httpx.AsyncClient(timeout=timeout) as proxy:
            state = ServerState(config, store, host, runner, proxy)
            app.state.art = state
            for job in await _db(store.recover):
                runner.submit(job)
            if on_ready is not None:
                on_ready(state)
            try:
                yield
            finally:
                await runner.close()
                try:
                    await host.close()
                finally:
                    store.close()

    app = FastAPI(
        title="art serverless-RL API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    _install_error_handlers(app)
    _install_routes(app)
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    return app


def _install_routes(app: FastAPI) -> None:
    @app.post("/v1/preview/models")
    async def create_model(body: wire.CreateModelBody, request: Request) -> dict[str, Any]:
        state = state_of(request)
        try:
            entity = validate_name(body.entity or state.config.default_entity, "entity")
            project = validate_name(body.project, "project name")
            name = validate_name(body.name, "model name")
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        if not body.base_model.strip():
            raise ApiError(
                422, "base_model is empty; name the model to start from (a hub id or a server-side path)"
            )
        row, _ = await _db(
            state.store.create_model,
            entity,
            project,
            name,
            body.base_model,
            return_existing=body.return_existing,
        )
        return row.public()

    @app.delete("/v1/preview/models/{model_id}")
    async def delete_model(model_id: str, request: Request) -> None:
        state = state_of(request)
        async with state.runner.model_lock(model_id):
            await _db(state.store.delete_model, model_id)
        state.host.forget(model_id)

    @app.get("/v1/preview/models/{model_id}/checkpoints")
    async def list_checkpoints(
        model_id: str,
        request: Request,
        after: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        order: Literal["asc", "desc"] = "asc",
    ) -> dict[str, Any]:
        store = state_of(request).store
        rows, has_more = await _db(store.list_checkpoints, model_id, after=after, limit=limit, order=order)
        return {"data": [row.public() for row in rows], "has_more": has_more}

    @app.delete("/v1/preview/models/{model_id}/checkpoints")
    async def delete_checkpoints(
        model_id: str, body: wire.DeleteCheckpointsBody, request: Request
    ) -> dict[str, Any]:
        state = state_of(request)
        row = await _db(state.store.get_model, model_id)
        async with state.runner.model_lock(model_id):
            kept = await _db(state.store.checkpoint_steps, model_id)
            wanted = sorted(set(body.steps))
            found = [step for step in wanted if step in kept]
            if kept and kept[-1] in found:
                raise ApiError(
                    400,
                    f"step {kept[-1]} is the latest checkpoint of model {model_id}; training continues from it, so it "
                    "cannot be deleted (delete the model instead)",
                )
            if found:
                await state.host.delete_checkpoints(row, [step for step in kept if step not in found])
                await _db(state.store.delete_checkpoint_records, model_id, found)
        return {"deleted_count": len(found), "not_found_steps": [step for step in wanted if step not in kept]}

    @app.post("/v1/preview/training-jobs")
    async def create_training_job(body: wire.CreateTrainingJobBody, request: Request) -> dict[str, Any]:
        state = state_of(request)
        row = await _db(state.store.get_model, body.model_id)
        groups = parse_groups(body.trajectory_groups)
        try:
            options = train_options(
                body.experimental_config, state.host.accepted_options, state.config.backend
            )
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        stored = {
            "trajectory_groups": [group.model_dump(mode="json") for group in groups],
            "options": options,
        }
        job = await _db(state.store.create_job, row.id, stored)
        state.runner.submit(job)
        return {"id": job.id}

    @app.get("/v1/preview/training-jobs/{job_id}")
    async def get_training_job(job_id: str, request: Request) -> dict[str, Any]:
        job = await _db(state_of(request).store.get_job, job_id)
        return {"id": job.id, "model_id": job.model_id, "status": job.status}

    @app.get("/v1/preview/training-jobs/{job_id}/events")
    async def list_events(
        job_id: str, request: Request, after: str | None = None, limit: int = Query(100, ge=1, le=1000)
    ) -> dict[str, Any]:
        if after is not None and not after.isdigit():
            raise ApiError(
                422,
                f"after={after!r} is not an event id from this server; pass the id of the last event seen",
            )
        store = state_of(request).store
        events, has_more = await _db(store.list_events, job_id, None if after is None else int(after), limit)
        return {"data": [event.public() for event in events], "has_more": has_more}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        models = await _db(state_of(request).store.models_with_steps)
        return models_list([(row.entity, row.project, row.name, steps) for row, steps in models])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: dict[str, Any], request: Request) -> Response:
        state = state_of(request)
        public = body.get("model")
        if not isinstance(public, str):
            raise ApiError(422, "'model' is missing; pass model.get_inference_name() as the model")
        try:
            entity, project, name, step = wire.parse_artifact_name(public)
        except ValueError as error:
            raise ApiError(404, str(error), "not_found_error") from None
        row = await _db(state.store.find_model, entity, project, name)
        steps = await _db(state.store.checkpoint_steps, row.id)
        base_url, api_key, names = await state.host.inference_target(row, step, steps)
        names = ModelNames(names.upstream, public, {**names.aliases, names.upstream: public})
        try:
            return await forward_chat(state.proxy, base_url=base_url, api_key=api_key, body=body, names=names)
        except httpx.TransportError as error:
            raise ApiError(
                502,
                f"the {state.config.backend!r} backend's inference endpoint failed: {error!r}",
                "server_error",
            ) from None

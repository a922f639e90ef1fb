"""The FastAPI app of the serverless-RL API (docs/protocols.md §1), over any installed training backend."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from art_core.plugin_api import get_backend_class
from art_serverless.server.guard import GuardMiddleware
from art_serverless.server.host import BackendHost
from art_serverless.server.jobs import JobRunner
from art_serverless.server.routes import router
from art_serverless.server.sft_routes import sft_router
from art_serverless.server.state import ApiError, ServerConfig, ServerState, run_db, validation_message
from art_serverless.server.store import ConflictError, NotFoundError, Store

__all__ = ["DATABASE_NAME", "ServerConfig", "ServerState", "create_app"]

logger = logging.getLogger("art_serverless.server")
DATABASE_NAME = "serverless.sqlite3"


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


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
        return _error(422, validation_message(error.errors()), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal server error: {type(error).__name__}: {error}", "server_error")


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
        # rollouts come hundreds at a time: httpx's default pool (100 connections, 20 kept alive) queued them
        # and reopened connections for every burst
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=512)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as proxy:
            state = ServerState(config, store, host, runner, proxy)
            app.state.art = state
            for job in await run_db(store.recover):
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
    app.include_router(router)
    app.include_router(sft_router)
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    return app

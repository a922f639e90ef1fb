"""The FastAPI app: the 19 Tinker routes over a ``TinkerService``, ``X-API-Key`` auth and JSON errors."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from tinker import types

from art_tinker.server.errors import Unauthorized, UserError
from art_tinker.server.futures import Failure, JsonResult, ProtoResult
from art_tinker.server.protocol import API_PREFIX, CLIENT_CONFIG, DYNAMIC_CONFIG, PROTOBUF
from art_tinker.server.service import TinkerService
from art_tinker.server.wire import decode_forward_backward

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=pydantic.BaseModel)
HOUSEKEEPING_PERIOD_S = 30.0


def _error(status: int, kind: str, message: str) -> JSONResponse:
    # A body is required: the SDK treats a 400 with an empty body as a proxy hiccup and retries it.
    return JSONResponse(
        {"error": kind, "message": message}, status_code=status, headers={"x-should-retry": "false"}
    )


async def _body(request: Request, max_body_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise UserError(f"request body of {declared} bytes is over this server's limit of {max_body_bytes}")
    body = await request.body()
    if len(body) > max_body_bytes:
        raise UserError(f"request body of {len(body)} bytes is over this server's limit of {max_body_bytes}")
    if request.headers.get("content-encoding", "").lower() == "zstd":
        import zstandard

        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=max_body_bytes)
        except zstandard.ZstdError as error:
            raise UserError(f"zstd body could not be decompressed: {error}") from None
    return body


async def _parse(request: Request, model: type[M], max_body_bytes: int) -> M:
    """The JSON body as the SDK's own request type; anything else is a 400 naming the problem."""
    body = await _body(request, max_body_bytes)
    try:
        raw = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"request body is not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise UserError(f"request body must be a JSON object, not {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5]
        )
        raise UserError(f"{model.__name__} is malformed: {problems}") from None


class _Routes:
    """Registers handlers under ``/api/v1`` with JSON errors; ``parse`` reads a body as an SDK request type."""

    def __init__(self, app: FastAPI, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    def __call__(self, method: str, path: str) -> Callable[[Callable[..., Awaitable[Any]]], Any]:
        def register(handler: Callable[..., Awaitable[Any]]) -> Any:
            async def endpoint(request: Request) -> Response:
                try:
                    result = await handler(request, **request.path_params)
                except UserError as error:
                    return _error(error.status_code, error.kind, str(error))
                return result if isinstance(result, Response) else JSONResponse(result)

            endpoint.__name__ = handler.__name__
            self.app.add_api_route(API_PREFIX + path, endpoint, methods=[method])
            return handler

        return register

    async def parse(self, request: Request, model: type[M]) -> M:
        return await _parse(request, model, self.max_body_bytes)

    async def body(self, request: Request) -> bytes:
        return await _body(request, self.max_body_bytes)


def create_app(service: TinkerService, *, api_key: str, max_body_bytes: int = 512 * 1024 * 1024) -> FastAPI:
    """The Tinker-API app; every ``/api/v1`` route but ``healthz`` requires ``X-API-Key: api_key``."""
    if not api_key.startswith("tml-"):
        raise ValueError("the server's api_key must start with 'tml-' (the tinker SDK refuses other keys)")
    expected = api_key.encode()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_housekeeping(service))
        try:
            yield
        finally:
            task.cancel()
            await service.close()

    app = FastAPI(title="art tinker loopback server", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            if request.url.path.startswith(API_PREFIX) and request.url.path != f"{API_PREFIX}/healthz":
                given = request.headers.get("x-api-key", "").encode()
                if not hmac.compare_digest(given, expected):
                    raise Unauthorized(
                        "missing or wrong X-API-Key; set TINKER_API_KEY to the key this server was started with"
                    )
            return await call_next(request)
        except UserError as error:
            return _error(error.status_code, error.kind, str(error))

    routes = _Routes(app, max_body_bytes)
    _session_routes(routes, service)
    _training_routes(routes, service)
    _sampling_routes(routes, service)
    return app


async def _housekeeping(service: TinkerService) -> None:
    while True:
        await asyncio.sleep(HOUSEKEEPING_PERIOD_S)
        try:
            await service.housekeeping()
        except Exception:
            logger.exception("housekeeping failed")


def _session_routes(route: _Routes, service: TinkerService) -> None:
    @route("GET", "/healthz")
    async def healthz(request: Request) -> Any:
        return {"status": "ok"}

    @route("POST", "/client/config")
    async def client_config(request: Request) -> Any:
        await route.parse(request, types.ClientConfigRequest)
        return CLIENT_CONFIG

    @route("POST", "/client/dynamic_config")
    async def client_dynamic_config(request: Request) -> Any:
        await route.parse(request, types.ClientConfigRequest)
        return DYNAMIC_CONFIG

    @route("POST", "/create_session")
    async def create_session(request: Request) -> Any:
        return service.create_session(await route.parse(request, types.CreateSessionRequest))

    @route("POST", "/session_heartbeat")
    async def session_heartbeat(request: Request) -> Any:
        return service.heartbeat((await route.parse(request, types.SessionHeartbeatRequest)).session_id)

    @route("POST", "/sessions/{session_id}/finish")
    async def finish_session(request: Request, session_id: str) -> Any:
        await route.body(request)
        await service.finish_session(session_id)
        return None

    @route("POST", "/telemetry")
    async def telemetry(request: Request) -> Any:
        await route.body(request)  # accepted and dropped: nothing leaves this machine
        return {"status": "accepted"}

    @route("POST", "/retrieve_future")
    async def retrieve_future(request: Request) -> Any:
        wanted = await route.parse(request, types.FutureRetrieveRequest)
        outcome = await service.retrieve(wanted.request_id)
        if outcome is None:
            return {"type": "try_again", "request_id": wanted.request_id, "queue_state": "active"}
        if isinstance(outcome, ProtoResult):
            return Response(outcome.payload, media_type=PROTOBUF)
        if isinstance(outcome, Failure):
            return {"error": outcome.message, "category": outcome.category}
        assert isinstance(outcome, JsonResult)
        return outcome.payload


def _training_routes(route: _Routes, service: TinkerService) -> None:
    @route("POST", "/create_model")
    async def create_model(request: Request) -> Any:
        return service.create_model(await route.parse(request, types.CreateModelRequest))

    @route("POST", "/get_info")
    async def get_info(request: Request) -> Any:
        return service.get_info(await route.parse(request, types.GetInfoRequest))

    @route("POST", "/forward_backward")
    async def forward_backward(request: Request) -> Any:
        content_type = request.headers.get("content-type", "")
        if PROTOBUF not in content_type:
            raise UserError(f"forward_backward takes {PROTOBUF}, not {content_type or 'no content type'}")
        return service.forward_backward(decode_forward_backward(await route.body(request)))

    @route("POST", "/optim_step")
    async def optim_step(request: Request) -> Any:
        return service.optim_step(await route.parse(request, types.OptimStepRequest))

    @route("POST", "/save_weights")
    async def save_weights(request: Request) -> Any:
        return service.save_weights(await route.parse(request, types.SaveWeightsRequest))

    @route("POST", "/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request) -> Any:
        return service.save_weights_for_sampler(
            await route.parse(request, types.SaveWeightsForSamplerRequest)
        )

    @route("POST", "/load_weights")
    async def load_weights(request: Request) -> Any:
        return service.load_weights(await route.parse(request, types.LoadWeightsRequest))

    @route("GET", "/training_runs/{model_id}/checkpoints")
    async def list_checkpoints(request: Request, model_id: str) -> Any:
        return service.list_checkpoints(model_id)

    @route("DELETE", "/training_runs/{model_id}/checkpoints/{checkpoint_id:path}")
    async def delete_checkpoint(request: Request, model_id: str, checkpoint_id: str) -> Any:
        service.delete_checkpoint(model_id, checkpoint_id)
        return None


def _sampling_routes(route: _Routes, service: TinkerService) -> None:
    @route("POST", "/create_sampling_session")
    async def create_sampling_session(request: Request) -> Any:
        return service.create_sampling_session(await route.parse(request, types.CreateSamplingSessionRequest))

    @route("GET", "/samplers/{sampler_id}")
    async def get_sampler(request: Request, sampler_id: str) -> Any:
        return service.get_sampler(sampler_id)

    @route("POST", "/asample")
    async def asample(request: Request) -> Any:
        return service.asample(await route.parse(request, types.SampleRequest))

"""The OpenAI-compatible HTTP server over any ``Engine``, reusable by other plugins.

``create_app(engine, api_key=...)`` builds the FastAPI app (``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``); ``InferenceServer(app)`` runs it with uvicorn in a background thread bound to 127.0.0.1 on a
free port, so the server keeps answering while the caller's event loop is busy (e.g. training). Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Another plugin serves its own sampler by implementing ``art_local.inference.engine.Engine`` (``served_models``,
``resolve``, ``async generate``) and::

    server = InferenceServer(create_app(MyEngine(), api_key=key))
    await server.start()          # server.base_url == "http://127.0.0.1:<port>/v1"
    ...
    await server.stop()           # the port is free again
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from art_core.plugin_api import KEEP_ALIVE_S, bind_socket, url_host
from art_local.inference.batching import EngineFailure
from art_local.inference.engine import Engine, ServedModel, UnknownModelError
from art_local.inference.protocol import (
    ChatCompletionRequest,
    RequestError,
    chat_completion_response,
    render_prompt,
    sampling_params,
)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code, param), status_code=status)


class BodySizeLimit:
    """ASGI middleware: answers 413 when a request body exceeds ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0
        state = {"started": False, "rejected": False}

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not state["rejected"]:
                # Answer 413 now and tell the app the client left: frameworks turn errors raised while
                # reading the body into their own 400, so raising here would lose the status.
                if not state["started"]:
                    await self._reject(scope, receive, send)
                state["rejected"] = True
            return {"type": "http.disconnect"} if state["rejected"] else message

        async def guarded_send(message: Message) -> None:
            if state["rejected"]:
                return  # the 413 went out already
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not state["rejected"]:
                raise

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(
            413,
            f"request body exceeds {self.max_bytes} bytes; send a smaller request",
            "invalid_request_error",
            "request_too_large",
        )
        await response(scope, receive, send)


class ApiKeyAuth:
    """ASGI middleware: every ``/v1`` request must send ``Authorization: Bearer <api_key>`` (constant-time check)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error(
                    401,
                    "missing or wrong API key; send 'Authorization: Bearer <key>' with the key the backend returned",
                    "invalid_request_error",
                    "invalid_api_key",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors
        )
        return _error(
            400, f"invalid request: {message}", "invalid_request_error", "invalid_request", where or None
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")


async def _client_left(request: Request) -> None:
    """Return once the client has disconnected (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _at_least_tokens(served: ServedModel, body: ChatCompletionRequest) -> int:
    """A cheap lower bound on the prompt's tokens: its characters over the longest token's (no tokenizing)."""
    chars = sum(len(v) for m in body.messages for v in m.values() if isinstance(v, str))
    return chars // max(longest_token_chars(served.tokenizer), 1)


_LONGEST_TOKEN: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def longest_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry, in characters (cached per tokenizer, which the cache does not keep alive)."""
    try:
        return _LONGEST_TOKEN[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: measure each time
        return max((len(t) for t in tokenizer.get_vocab()), default=1)
    longest = _LONGEST_TOKEN[tokenizer] = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return longest


async def _complete(engine: Engine, body: ChatCompletionRequest) -> Any:
    """Answer one chat completion; tokenizing and building the response run off the event loop."""
    try:
        served = engine.resolve(body.model)
        if (at_least := _at_least_tokens(served, body)) >= served.context_length:
            raise RequestError(
                f"the messages hold at least {at_least} tokens; {body.model!r} accepts {served.context_length} "
                "(prompt and completion together): shorten the prompt",
                "messages",
            )
        prompt = await asyncio.to_thread(render_prompt, served, body)
        params = sampling_params(served, body, len(prompt))
        completions = await engine.generate(body.model, prompt, params)
        return await asyncio.to_thread(chat_completion_response, served, body, len(prompt), completions)
    except UnknownModelError as exc:
        return _error(404, str(exc), "invalid_request_error", "model_not_found", "model")
    except RequestError as exc:
        return _error(400, str(exc), "invalid_request_error", "invalid_request", exc.param)
    except Exception as exc:  # the engine failed: answer 500/503 with the cause, keep serving
        logging.getLogger(__name__).error("chat completion for %r failed: %r", body.model, exc)
        status = 503 if isinstance(exc, EngineFailure) else 500
        return _error(
            status, f"inference failed: {type(exc).__name__}: {exc}", "server_error", "internal_error"
        )


def create_app(
    engine: Engine,
    *,
    api_key: str,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    health: Callable[[], str | None] | None = None,
) -> FastAPI:
    """The OpenAI-compatible FastAPI app over ``engine``; every ``/v1`` route requires ``api_key``.

    ``health()`` returns None while the engine works, else the cause: ``/health`` then answers 503 with it.
    """
    if not api_key:
        raise ValueError("api_key is empty; the server requires a key (use secrets.token_urlsafe())")
    app = FastAPI(title="art inference", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)

    @app.get("/health")
    async def health_route() -> Any:
        problem = health() if health is not None else None
        if problem is not None:
            return _error(503, problem, "server_error", "engine_failed")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m.name, "object": "model", "created": m.created, "owned_by": "art"}
                for m in engine.served_models()
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        work = asyncio.ensure_future(_complete(engine, body))
        gone = asyncio.ensure_future(_client_left(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client left (or this handler was cancelled): stop its work
                work.cancel()
        if not work.done() or work.cancelled():
            return _error(499, "the client closed the connection", "invalid_request_error", "client_closed")
        return work.result()

    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(ApiKeyAuth, api_key=api_key)  # added last: runs first
    return app


class _StartupLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class InferenceServer:
    """Runs an ASGI app with uvicorn in a daemon thread; ``start``/``stop`` have timeouts."""

    def __init__(self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._app, self._host, self._requested_port = app, host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._failure: BaseException | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """``http://host:port/v1`` (valid after ``start``)."""
        if not self.port:
            raise RuntimeError("the server has not started; await start() first")
        return f"http://{url_host(self._host)}:{self.port}/v1"

    async def start(self, timeout_s: float = 60.0) -> None:
        """Bind, start serving, and return once the server accepts requests (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._socket = bind_socket(self._host, self._requested_port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
        self._server = server = uvicorn.Server(config)
        log = _StartupLog()
        logging.getLogger("uvicorn.error").addHandler(log)
        self._failure = None
        self._thread = threading.Thread(
            target=self._run, args=(server, self._socket), daemon=True, name="art-http"
        )
        self._thread.start()
        try:
            deadline = time.monotonic() + timeout_s
            while not server.started:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    why = (
                        "exited" if not self._thread.is_alive() else f"did not start within {timeout_s:.0f} s"
                    )
                    text = "\n".join(log.lines) or repr(self._failure)
                    await self.stop()
                    raise RuntimeError(f"inference server {why}: {text}") from self._failure
                await asyncio.sleep(0.01)
        finally:
            logging.getLogger("uvicorn.error").removeHandler(log)

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # SystemExit from uvicorn's start-up failures included
            self._failure = exc

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving, wait for the thread, and release the port."""
        if self._server is not None:
            self._server.should_exit = True
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, timeout_s)
            if thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                await asyncio.to_thread(thread.join, 5.0)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._server = None

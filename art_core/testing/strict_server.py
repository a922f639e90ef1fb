"""A stdlib OpenAI-compatible endpoint for ``StrictBackend`` (no fastapi in the core)."""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

MAX_BODY_BYTES = 1 << 20


class _Completion(Protocol):
    @property
    def token_ids(self) -> list[int]: ...

    @property
    def logprobs(self) -> list[float]: ...

    @property
    def finish_reason(self) -> str: ...

    @property
    def text(self) -> str: ...


Sampler = Callable[[str, int, float, "int | None"], _Completion]


class StrictServer:
    """Serves ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /health`` on 127.0.0.1."""

    def __init__(
        self, sample: Sampler, served: Callable[[], list[str]], *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.api_key = "strict-" + secrets.token_hex(16)
        self._sample = sample
        self._served = served
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="strict-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        # size: builds the handler class around this server; each of its methods (one per route) is short
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the OpenAI client reuses connections
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _reply(self, status: int, payload: object) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str, kind: str) -> None:
                self._reply(status, {"error": {"message": message, "type": kind, "code": status}})

            def _authorized(self) -> bool:
                given = self.headers.get("Authorization", "")
                if hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                    return True
                self._error(401, "missing or wrong API key", "authentication_error")
                return False

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._reply(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    if self._authorized():
                        self._reply(200, {"object": "list", "data": _models(server._served())})
                elif self.path.startswith("/v1/") and not self._authorized():
                    return
                else:
                    self._error(404, f"no route {self.path}", "not_found")

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                if self.path != "/v1/chat/completions":
                    self._error(404, f"no route {self.path}", "not_found")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    self._error(
                        413, f"body of {length} bytes is over {MAX_BODY_BYTES}", "invalid_request_error"
                    )
                    return
                try:
                    request = json.loads(self.rfile.read(length))
                    model = request["model"]
                    messages = request["messages"]
                    if not isinstance(model, str) or not isinstance(messages, list) or not messages:
                        raise ValueError("model must be a string and messages a non-empty list")
                    max_tokens = int(request.get("max_completion_tokens") or request.get("max_tokens") or 16)
                    temperature = float(request.get("temperature", 1.0))
                    n = int(request.get("n") or 1)
                    seed = request.get("seed")
                    if not 1 <= n <= 64 or not 1 <= max_tokens <= 4096:
                        raise ValueError("n must be in [1, 64] and max_tokens in [1, 4096]")
                except (ValueError, KeyError, TypeError) as error:
                    self._error(400, f"malformed request: {error}", "invalid_request_error")
                    return
                try:
                    completions = [
                        server._sample(
                            model, max_tokens, temperature, None if seed is None else int(seed) + i
                        )
                        for i in range(n)
                    ]
                except LookupError as error:
                    self._error(404, str(error), "not_found")
                    return
                except ValueError as error:
                    self._error(404, str(error), "not_found")
                    return
                self._reply(200, _response(model, completions, bool(request.get("logprobs"))))

        return Handler


def _models(names: list[str]) -> list[dict[str, Any]]:
    return [{"id": name, "object": "model", "created": 0, "owned_by": "art-strict"} for name in names]


def _response(model: str, completions: list[_Completion], logprobs: bool) -> dict[str, Any]:
    choices = []
    for index, completion in enumerate(completions):
        choice: dict[str, Any] = {
            "index": index,
            "message": {"role": "assistant", "content": completion.text},
            "finish_reason": completion.finish_reason,
            "logprobs": None,
        }
        if logprobs:
            choice["logprobs"] = {
                "content": [
                    {"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
                    for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)
                ]
            }
        choices.append(choice)
    completion_tokens = sum(len(c.token_ids) for c in completions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": 0,
            "completion_tokens": completion_tokens,
            "total_tokens": completion_tokens,
        },
    }

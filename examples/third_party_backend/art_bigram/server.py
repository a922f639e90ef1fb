"""A small OpenAI-compatible endpoint on the standard library: the routes art's rollouts and the kit use.

``POST /v1/chat/completions`` (``logprobs=True`` gives ``token_id:<id>`` tokens, so choices can be trained as
sampled) and ``GET /v1/models``, on 127.0.0.1, behind a bearer API key compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class Sampled:
    """One completion: token ids, their logprobs, the text and why it ended ("stop" or "length")."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


# (served model name, max_tokens, temperature, seed) -> Sampled; raises LookupError for an unknown name or step
Sampler = Callable[[str, int, float, "int | None"], Sampled]


class InferenceServer:
    """Serves ``sample`` over HTTP on a background thread; ``stop()`` shuts it down."""

    def __init__(self, sample: Sampler, served: Callable[[], list[str]], host: str = "127.0.0.1") -> None:
        self.api_key = "bigram-" + secrets.token_hex(16)
        self.sample = sample
        self.served = served
        self._httpd = _HTTPServer(self, host)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bigram-server", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, app: InferenceServer, host: str) -> None:
        super().__init__((host, 0), _Handler)
        self.app = app


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the OpenAI client reuses connections
    disable_nagle_algorithm = True  # headers and body go out as two writes; do not wait for an ACK between

    def log_message(self, format: str, *args: Any) -> None:
        return

    @property
    def app(self) -> InferenceServer:
        return cast(_HTTPServer, self.server).app

    def _reply(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, f"Bearer {self.app.api_key}".encode()):
            return True
        self._error(401, "missing or wrong API key")
        return False

    def do_GET(self) -> None:
        if self.path != "/v1/models":
            self._error(404, f"no route {self.path}")
        elif self._authorized():
            models = [{"id": name, "object": "model", "owned_by": "art-bigram"} for name in self.app.served()]
            self._reply(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        if not self._authorized():
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._error(413, f"body of {length} bytes is over {MAX_BODY_BYTES}")
            return
        try:
            request = json.loads(self.rfile.read(length))
            model, messages = request["model"], request["messages"]
            if not isinstance(model, str) or not isinstance(messages, list) or not messages:
                raise ValueError("model must be a string and messages a non-empty list")
            max_tokens = int(request.get("max_completion_tokens") or request.get("max_tokens") or 16)
            temperature = float(request.get("temperature", 1.0))
            n, seed = int(request.get("n") or 1), request.get("seed")
            if not (1 <= n <= 64 and 1 <= max_tokens <= 4096):
                raise ValueError("n must be in [1, 64] and max_tokens in [1, 4096]")
        except (ValueError, KeyError, TypeError) as error:
            self._error(400, f"malformed request: {error}")
            return
        try:
            samples = [
                self.app.sample(model, max_tokens, temperature, None if seed is None else int(seed) + i)
                for i in range(n)
            ]
        except LookupError as error:
            self._error(404, str(error))
            return
        self._reply(200, _completion(model, samples, bool(request.get("logprobs"))))


def _completion(model: str, samples: list[Sampled], logprobs: bool) -> dict[str, Any]:
    choices = []
    for index, sampled in enumerate(samples):
        content: list[dict[str, Any]] = [
            {"token": f"token_id:{token}", "logprob": value, "bytes": None, "top_logprobs": []}
            for token, value in zip(sampled.token_ids, sampled.logprobs, strict=True)
        ]
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": sampled.text},
                "finish_reason": sampled.finish_reason,
                "logprobs": {"content": content} if logprobs else None,
            }
        )
    used = sum(len(sampled.token_ids) for sampled in samples)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": 0, "completion_tokens": used, "total_tokens": used},
    }

"""A real OpenAI-compatible judge on 127.0.0.1 whose answers the test scripts (well-formed, malformed, cut off,
slow, 5xx), and which records every request it got."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted answer: the assistant ``content`` (or an HTTP error ``status``), after ``delay`` seconds."""

    content: str = ""
    finish_reason: str = "stop"
    status: int = 200
    delay: float = 0.0


def scores_json(*scores: float, explanation: str = "because") -> str:
    """A well-formed judge answer scoring trajectories 1..n."""
    entries = [
        {"trajectory_id": str(i), "explanation": f"{explanation} {i}", "score": score}
        for i, score in enumerate(scores, 1)
    ]
    return json.dumps({"scores": entries})


class JudgeServer:
    """Serves ``POST /v1/chat/completions`` from ``replies`` in order (a 500 once they run out)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *replies: Reply | str) -> None:
        with self._lock:
            self.replies.extend(Reply(reply) if isinstance(reply, str) else reply for reply in replies)

    def _next(self, request: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(request)
            return (
                self.replies.pop(0) if self.replies else Reply(status=500, content="no scripted reply left")
            )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                reply = server._next(body)
                time.sleep(reply.delay)
                if reply.status != 200:
                    payload: dict[str, Any] = {"error": {"message": reply.content, "type": "server_error"}}
                else:
                    payload = {
                        "id": "judge-1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": reply.finish_reason,
                                "message": {"role": "assistant", "content": reply.content},
                            }
                        ],
                    }
                data = json.dumps(payload).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow reply

        return Handler

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def judge_server() -> Iterator[JudgeServer]:
    """Body of a fixture: a started server, stopped afterwards."""
    with JudgeServer() as server:
        yield server

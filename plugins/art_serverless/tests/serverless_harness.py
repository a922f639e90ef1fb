"""Test harness: the real app on a real uvicorn on loopback (in a thread or a subprocess), with a route log.

``RouteLog`` wraps the app as ASGI middleware: it records every request as it arrived on the wire (method, path,
query, JSON body) and can answer a chosen route with an error a given number of times (fault injection).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from serverless_toy_backend import ToyBackend
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from art_core.plugin_api import KEEP_ALIVE_S, bind_socket
from art_serverless.server import ServerConfig, create_app

TESTS_DIR = Path(__file__).resolve().parent


@dataclass
class Logged:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int


@dataclass
class Fault:
    method: str
    path: str
    remaining: int
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class RouteLog:
    """Record every request; answer injected faults before the app sees the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.entries: list[Logged] = []
        self.faults: list[Fault] = []

    def fail(
        self, method: str, path: str, *, times: int, status: int = 503, retry_after: str | None = None
    ) -> None:
        headers = [] if retry_after is None else [(b"retry-after", retry_after.encode())]
        self.faults.append(Fault(method, path, times, status, headers))

    def calls(self, method: str | None = None, path: str | None = None) -> list[Logged]:
        return [
            e
            for e in self.entries
            if (method is None or e.method == method) and (path is None or e.path == path)
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        method, path = scope["method"], scope["path"]
        query = dict(parse_qsl(scope["query_string"].decode()))
        for fault in self.faults:
            if fault.remaining > 0 and fault.method == method and fault.path == path:
                fault.remaining -= 1
                self.entries.append(Logged(method, path, query, body, fault.status))
                payload = json.dumps({"error": {"message": "injected fault"}}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": fault.status,
                        "headers": [(b"content-type", b"application/json"), *fault.headers],
                    }
                )
                await send({"type": "http.response.body", "body": payload})
                return
        entry = Logged(method, path, query, body, 0)
        self.entries.append(entry)  # logged on arrival: the client may see the answer before the app returns
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # e.g. a streaming response waiting for the disconnect
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            await send(message)

        await self.app(scope, replay, capture)


class ThreadServer:
    """uvicorn serving ``app`` on 127.0.0.1 (free port) in a background thread."""

    def __init__(self, app: ASGIApp) -> None:
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=KEEP_ALIVE_S)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not stop"


class ProcessServer:
    """``art serverless serve`` (or the toy-backend launcher) as a subprocess; reads its 'listening on' line."""

    def __init__(
        self, argv: list[str], *, env: dict[str, str] | None = None, ready_timeout: float = 120.0
    ) -> None:
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.url = ""
        self.output: list[str] = []
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> ProcessServer:
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.kill()
                raise RuntimeError(
                    f"server not ready in {self.ready_timeout} s:\n{''.join(self.output)}"
                ) from None
            if line is None:
                raise RuntimeError(f"server exited before it was ready:\n{''.join(self.output)}")
            if "listening on " in line:
                self.url = line.split("listening on ", 1)[1].split()[0]
                return self

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        """SIGTERM and wait (graceful shutdown)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def process_server(argv: list[str], **kwargs: Any) -> Iterator[ProcessServer]:
    server = ProcessServer(argv, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()
        server.kill()


def toy_server_argv(data_dir: Path, key_file: Path, *extra: str) -> list[str]:
    """The subprocess command line of a server with the toy backend."""
    return [
        sys.executable,
        str(TESTS_DIR / "serverless_toy_server.py"),
        "serve",
        "--backend",
        "toy",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--api-key-file",
        str(key_file),
        *extra,
    ]


API_KEY = "test-key-0123456789"


@dataclass
class Served:
    url: str
    api_key: str
    log: RouteLog
    backend: ToyBackend
    data_dir: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@contextmanager
def serve_toy(data_dir: Path, backend: ToyBackend | None = None, **config: Any) -> Iterator[Served]:
    """The app over a ToyBackend, on a loopback uvicorn thread, wrapped in a route log."""
    toy = backend if backend is not None else ToyBackend()
    app = create_app(
        ServerConfig(data_dir=data_dir, api_key=API_KEY, backend="toy", backend_factory=lambda: toy, **config)
    )
    log = RouteLog(app)
    with ThreadServer(log) as server:
        yield Served(server.url, API_KEY, log, toy, data_dir)

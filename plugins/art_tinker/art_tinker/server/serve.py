"""Build and run the loopback server (uvicorn on 127.0.0.1 by default)."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from art_core.plugin_api import KEEP_ALIVE_S, bind_socket, is_loopback, url_host

DEFAULT_ROOT = Path(".art") / "tinker_server"


def default_api_key() -> tuple[str, bool]:
    """``$ART_TINKER_API_KEY`` or a fresh random ``tml-`` key; the flag says whether it was generated."""
    given = os.environ.get("ART_TINKER_API_KEY")
    if given:
        return given, False
    return "tml-" + secrets.token_urlsafe(24), True


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens, its key, where checkpoints live, and its timing knobs."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = field(default_factory=lambda: default_api_key()[0])
    root: Path = DEFAULT_ROOT
    device: str | None = None
    long_poll_s: float = 20.0
    session_timeout_s: float = 900.0
    max_body_bytes: int = 512 * 1024 * 1024


def build_app(config: ServerConfig) -> FastAPI:
    """The FastAPI app over art-local's engine and a checkpoint store at ``config.root``."""
    from art_tinker.server.app import create_app
    from art_tinker.server.local_engine import LocalEngine
    from art_tinker.server.service import TinkerService
    from art_tinker.server.store import CheckpointStore

    service = TinkerService(
        LocalEngine(device=config.device),
        CheckpointStore(config.root),
        long_poll_s=config.long_poll_s,
        session_timeout_s=config.session_timeout_s,
    )
    return create_app(service, api_key=config.api_key, max_body_bytes=config.max_body_bytes)


def _warm_up() -> None:
    """Import the trainer's heavy modules in the background while the server starts accepting requests."""
    import peft  # noqa: F401

    import art_local.training  # noqa: F401  (torch, transformers)


def serve(config: ServerConfig, *, log_level: str = "warning") -> None:
    """Run until interrupted; prints ``art tinker server listening on http://HOST:PORT`` once it accepts."""
    import uvicorn

    threading.Thread(target=_warm_up, name="tinker-warm-up", daemon=True).start()
    app = build_app(config)
    # long-polls hold connections for up to long_poll_s: do not let them delay a shutdown for longer than this
    settings = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S
    )
    server = uvicorn.Server(settings)
    sock = bind_socket(config.host, config.port)
    if not is_loopback(config.host):
        print(
            f"art tinker server: WARNING: listening on {config.host}, reachable from other machines",
            file=sys.stderr,
            flush=True,
        )

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn exposes only a flag)
            await asyncio.sleep(0.05)
        if server.started:
            port = sock.getsockname()[1]
            print(f"art tinker server listening on http://{url_host(config.host)}:{port}", flush=True)
        await task

    try:
        asyncio.run(run())
    finally:
        sock.close()
    if not server.started:
        sys.exit(1)

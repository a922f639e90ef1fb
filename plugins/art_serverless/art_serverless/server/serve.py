"""Run the app with uvicorn on a socket we bind ourselves (so ``port=0`` works and the real port is known)."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import uvicorn

from art_core.plugin_api import KEEP_ALIVE_S, atomic_write_text, bind_socket, is_loopback, url_host
from art_serverless.server.app import ServerConfig, ServerState, create_app


def read_or_create_api_key(path: Path) -> str:
    """The key in ``path``; a missing file gets a fresh random key, written atomically with mode 0600."""
    if path.exists():
        key = path.read_text().strip()
        if len(key) < 8:
            raise ValueError(
                f"{path} holds no API key of at least 8 characters; put a random key in it or delete it"
            )
        return key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = "art-" + secrets.token_urlsafe(32)
    atomic_write_text(path, key + "\n", mode=0o600)
    return key


def serve(
    config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"
) -> None:
    """Serve until interrupted; prints one ``art serverless: listening on URL`` line once ready."""
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown_host = url_host(host)

    def ready(state: ServerState) -> None:
        print(
            f"art serverless: listening on http://{shown_host}:{bound_port}/v1 "
            f"(backend {config.backend}, data {config.data_dir})",
            flush=True,
        )

    if not is_loopback(host):
        print(
            f"art serverless: WARNING: listening on {host}, reachable from other machines",
            file=sys.stderr,
            flush=True,
        )
    app = create_app(config, on_ready=ready)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=log_level,
            lifespan="on",
            timeout_graceful_shutdown=30,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise SystemExit("art serverless: the server did not start (see the error above)")

"""Run the app with uvicorn on a socket we bind ourselves (so ``port=0`` works and the real port is known)."""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sys
from pathlib import Path

import uvicorn

from art_core.plugin_api import atomic_write_text
from art_serverless.server.app import ServerConfig, ServerState, create_app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(
            error.errno, f"cannot listen on {host}:{port}: {error.strerror}; pick another --port"
        ) from error
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    shown_host = f"[{host}]" if ":" in host else host

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
        uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=30)
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise SystemExit("art serverless: the server did not start (see the error above)")

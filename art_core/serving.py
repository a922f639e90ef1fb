"""What every HTTP server the project ships shares: its listening socket and its connection settings.

Standard library only (no web framework is imported here); the servers pass these to uvicorn themselves.
"""

from __future__ import annotations

import ipaddress
import socket

# Idle keep-alive connections outlive the client's pool expiry (httpx and the OpenAI client keep one 5 s):
# a server that closes an idle connection just as a client reuses it is a ReadError on the client. uvicorn's
# own default is 5 s, the same as the clients', so under load that race is lost now and then.
KEEP_ALIVE_S = 75

# How many connections may wait to be accepted: a rollout wave opens hundreds at once.
LISTEN_BACKLOG = 2048


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one); a clear error when it is taken."""
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP, and
    # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle), measured here.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno,
            f"cannot listen on {host}:{port} ({exc.strerror}); pick another port (0 picks a free one)",
        ) from exc
    sock.listen(LISTEN_BACKLOG)
    return sock


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost': the addresses other machines cannot reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host

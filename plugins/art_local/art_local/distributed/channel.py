"""The local channel between the parent (the user's event loop) and global rank 0 of the worker group.

A Unix-domain stream socket in a 0700 temporary directory of the parent. Every message is one frame:

    header  = struct "!4sBQ": magic b"ARTd", kind (1 = UTF-8 JSON, 2 = pickle), payload length in bytes
    payload = the encoded message

Rank 0 connects and first sends a JSON hello (``{"token": ..., "world_size": ..., "workers": [[host, pid],
...]}``); the parent compares the token in constant time and only then unpickles anything. After the hello the
parent sends one pickled request (``art_local.distributed.protocol``) at a time and reads one pickled reply. Every
read and write has a deadline; EOF is ``ChannelClosed``.
"""

from __future__ import annotations

import json
import pickle
import select
import socket
import struct
import time
from typing import Any

MAGIC = b"ARTd"
JSON_FRAME, PICKLE_FRAME = 1, 2
MAX_JSON_BYTES = 1 << 16  # the hello is read before the peer is authenticated: keep it small
HEADER = struct.Struct("!4sBQ")


class ChannelClosed(ConnectionError):
    """The peer closed the channel (end of file) before a whole frame arrived."""


class ProtocolError(ValueError):
    """A frame that does not follow the channel's format."""


def _deadline(timeout_s: float) -> float:
    return time.monotonic() + timeout_s


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"timed out while {what} on the trainer channel")
    return left


def wait_readable(sock: socket.socket, timeout_s: float) -> bool:
    """True when ``sock`` has data (or EOF) to read within ``timeout_s``."""
    readable, _, _ = select.select([sock], [], [], max(0.0, timeout_s))
    return bool(readable)


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        sock.settimeout(_remaining(deadline, "sending"))
        try:
            sent = sock.send(view)
        except TimeoutError:
            continue  # _remaining raises once the deadline has passed
        view = view[sent:]


def _recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        sock.settimeout(_remaining(deadline, "receiving"))
        try:
            received = sock.recv_into(view)
        except TimeoutError:
            continue
        if received == 0:
            raise ChannelClosed("the peer closed the trainer channel")
        view = view[received:]
    return bytes(buffer)


def send_frame(sock: socket.socket, kind: int, payload: bytes, *, timeout_s: float) -> None:
    """Write one frame within ``timeout_s``."""
    _send_all(sock, HEADER.pack(MAGIC, kind, len(payload)) + payload, _deadline(timeout_s))


def recv_frame(sock: socket.socket, *, timeout_s: float, max_bytes: int | None = None) -> tuple[int, bytes]:
    """Read one whole frame within ``timeout_s``; returns (kind, payload)."""
    deadline = _deadline(timeout_s)
    magic, kind, length = HEADER.unpack(_recv_exactly(sock, HEADER.size, deadline))
    if magic != MAGIC or kind not in (JSON_FRAME, PICKLE_FRAME):
        raise ProtocolError(
            f"bad frame header {magic!r}/{kind}; is another program connected to the channel?"
        )
    if max_bytes is not None and length > max_bytes:
        raise ProtocolError(f"a frame of {length} bytes exceeds the limit of {max_bytes}")
    return kind, _recv_exactly(sock, length, deadline)


def send_json(sock: socket.socket, value: dict[str, Any], *, timeout_s: float) -> None:
    """Send a JSON frame (the hello)."""
    send_frame(sock, JSON_FRAME, json.dumps(value).encode(), timeout_s=timeout_s)


def recv_json(sock: socket.socket, *, timeout_s: float) -> dict[str, Any]:
    """Read a JSON frame of at most ``MAX_JSON_BYTES`` (the hello, before authentication)."""
    kind, payload = recv_frame(sock, timeout_s=timeout_s, max_bytes=MAX_JSON_BYTES)
    if kind != JSON_FRAME:
        raise ProtocolError("expected the JSON hello frame first")
    value = json.loads(payload)
    if not isinstance(value, dict):
        raise ProtocolError("the hello must be a JSON object")
    return value


def send_message(sock: socket.socket, message: object, *, timeout_s: float) -> None:
    """Pickle ``message`` (requests, replies, tensors) into one frame."""
    send_frame(
        sock, PICKLE_FRAME, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), timeout_s=timeout_s
    )


def recv_message(sock: socket.socket, *, timeout_s: float) -> object:
    """Read one pickled frame (only ever from the authenticated peer)."""
    kind, payload = recv_frame(sock, timeout_s=timeout_s)
    if kind != PICKLE_FRAME:
        raise ProtocolError("expected a pickled message frame")
    return pickle.loads(payload)

"""The server's front door, before any route runs: Bearer-key auth (constant time) and a request-size limit.

Being ASGI middleware, it answers 401/413 before the body is parsed, so a request without the key can neither
change state nor learn anything from a validation error.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def error_body(status: int, message: str, kind: str) -> bytes:
    """``{"error": {"message", "type", "code"}}``, the shape OpenAI clients read."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


async def send_error(
    send: Send, status: int, message: str, kind: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """Answer a JSON error directly at the ASGI level."""
    body = error_body(status, message, kind)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer ...`` header, if any."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


class GuardMiddleware:
    """Refuse requests without the API key (401) or with a body over ``max_body_bytes`` (413)."""

    def __init__(self, app: ASGIApp, *, api_key: str, max_body_bytes: int) -> None:
        self.app = app
        self._key = api_key.encode()
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is None or not hmac.compare_digest(token, self._key):
            why = "missing" if token is None else "wrong"
            await send_error(
                send,
                401,
                f"{why} API key: send 'Authorization: Bearer <key>' with the key the server was started with",
                "authentication_error",
                ((b"www-authenticate", b"Bearer"),),
            )
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 (checked against Content-Length first, then as it streams)."""
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit():
            # a length of more digits than any real body has is refused before int() has to parse it
            size = int(declared) if len(declared) <= 18 else self.max_body_bytes + 1
            if size > self.max_body_bytes:
                await self._too_large(send, size)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message: dict[str, Any] = dict(await receive())
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send, size)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send, size: int) -> None:
        await send_error(
            send,
            413,
            f"request body of {size} bytes exceeds the server's limit of {self.max_body_bytes} bytes; send fewer "
            "trajectory groups per job or start the server with a larger --max-body-mb",
            "request_too_large",
        )

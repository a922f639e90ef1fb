"""What the server's routes share: its configuration, its live state, and the error they answer with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fastapi import Request

from art_core.plugin_api import validate_name
from art_serverless.server.host import BackendHost
from art_serverless.server.jobs import JobRunner
from art_serverless.server.store import Store

T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs; ``backend_factory`` (tests, embedding) overrides ``backend`` by name."""

    data_dir: Path
    api_key: str
    backend: str = "local"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    backend_factory: Callable[[], Any] | None = None
    default_entity: str = "local"
    max_body_bytes: int = 256 * 2**20
    inference_timeout: float = 600.0

    def __post_init__(self) -> None:
        if len(self.api_key) < 8:
            raise ValueError("the server's API key must have at least 8 characters; use a random one")
        validate_name(self.default_entity, "default entity")


@dataclass
class ServerState:
    """What the routes share: the store, the backend host, the job runner and the inference proxy client."""

    config: ServerConfig
    store: Store
    host: BackendHost
    runner: JobRunner
    proxy: httpx.AsyncClient


class ApiError(Exception):
    """An error answer: HTTP ``status`` with a message naming the bad value and the fix."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def state_of(request: Request) -> ServerState:
    """The server state of the app handling ``request``."""
    state: ServerState = request.app.state.art
    return state


async def run_db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a (blocking, fsyncing) store call off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def validation_message(errors: Any) -> str:
    """A short message from pydantic/FastAPI validation errors: where, and what is wrong."""
    parts = []
    for error in list(errors)[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)

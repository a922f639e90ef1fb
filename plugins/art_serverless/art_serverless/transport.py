"""The HTTP layer of the client: JSON over httpx, timeouts everywhere, and a retry policy safe for training.

GET and DELETE are idempotent, so they are retried with exponential backoff on connection errors, 408, 409, 429
and 5xx (honouring ``retry-after``). POST is never retried: a retried job submission could train twice.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

RETRYABLE_METHODS = frozenset({"GET", "DELETE"})
RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class RetryPolicy:
    """How GET/DELETE are retried: ``max_retries`` more attempts, delays doubling from ``initial_delay``."""

    max_retries: int = 4
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError(f"{self!r}: retries and delays must be non-negative")


class ServerlessAPIError(RuntimeError):
    """The service answered an error (``status_code``) or could not be reached (``status_code`` is None)."""

    def __init__(self, method: str, url: str, status_code: int | None, message: str) -> None:
        self.method = method
        self.url = url
        self.status_code = status_code
        self.message = message
        where = f"{method} {url}"
        if status_code is None:
            super().__init__(f"{where} failed: {message}")
        else:
            super().__init__(f"{where} returned {status_code}: {message}")

    @property
    def transient(self) -> bool:
        """True for failures that a later identical request may not hit (the ones GET/DELETE retry)."""
        return self.status_code is None or is_retryable_status(self.status_code)


def is_retryable_status(status_code: int) -> bool:
    """408, 409, 429 and every 5xx."""
    return status_code in RETRYABLE_STATUS or status_code >= 500


def retry_after_seconds(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """The delay a ``retry-after-ms`` / ``retry-after`` header asks for (seconds or an HTTP date), if any."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            value = float(milliseconds) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def retry_delay(attempt: int, policy: RetryPolicy, response: httpx.Response | None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): the server's ``retry-after`` when it gives one
    (capped by ``policy.max_retry_after``), else exponential backoff with jitter."""
    if response is not None:
        asked = retry_after_seconds(response.headers)
        if asked is not None:
            return min(asked, policy.max_retry_after)
    backoff = min(policy.initial_delay * 2.0**attempt, policy.max_delay)
    return backoff * (0.75 + 0.25 * random.random())


def error_message(response: httpx.Response) -> str:
    """The human message of an error response: ``{"error": {"message"}}``, ``{"detail"}`` or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        return str(error)
    return str(body)


def _hint(status_code: int) -> str:
    if status_code == 401:
        return " (check the API key: pass api_key= or set WANDB_API_KEY)"
    return ""


class ApiClient:
    """JSON requests against ``base_url`` with a Bearer key, per-request timeouts and the retry policy."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout,
        retry: RetryPolicy,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._retry = retry
        # An httpx.AsyncClient belongs to the event loop it first ran on; keep one per loop.
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        for key, (owner, _) in list(self._clients.items()):
            if owner.is_closed():
                del self._clients[key]
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=self._timeout,
                headers={"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"},
                follow_redirects=False,
            )
            entry = (loop, client)
            self._clients[id(loop)] = entry
        return entry[1]

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str | int] | None = None,
        json: Any = None,
    ) -> Any:
        """Send one request (retrying GET/DELETE per the policy) and return the decoded JSON body."""
        method = method.upper()
        client = self._client()
        url = f"{self.base_url}{path}"
        retries = self._retry.max_retries if method in RETRYABLE_METHODS else 0
        for attempt in range(retries + 1):
            response: httpx.Response | None = None
            try:
                response = await client.request(method, path, params=params, json=json)
            except httpx.TransportError as error:
                failure = ServerlessAPIError(method, url, None, f"{type(error).__name__}: {error}")
                failure.__cause__ = error
            else:
                if response.is_success:
                    return _decode(method, url, response)
                failure = ServerlessAPIError(
                    method, url, response.status_code, error_message(response) + _hint(response.status_code)
                )
            if attempt >= retries or not failure.transient:
                raise failure
            await asyncio.sleep(retry_delay(attempt, self._retry, response))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def get(self, path: str, params: dict[str, str | int] | None = None) -> Any:
        """GET (retried)."""
        return await self.request("GET", path, params=params)

    async def post(self, path: str, json: Any) -> Any:
        """POST (never retried)."""
        return await self.request("POST", path, json=json)

    async def delete(self, path: str, json: Any = None) -> Any:
        """DELETE (retried)."""
        return await self.request("DELETE", path, json=json)

    async def aclose(self) -> None:
        """Close the connection pools of every event loop still open."""
        clients, self._clients = self._clients, {}
        for owner, client in clients.values():
            if not owner.is_closed() and owner is asyncio.get_running_loop():
                await client.aclose()


def _decode(method: str, url: str, response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError as error:
        raise ServerlessAPIError(
            method, url, response.status_code, f"the response is not JSON: {response.text[:200]!r}"
        ) from error

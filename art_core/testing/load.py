"""A bounded load and cancellation harness for any OpenAI-compatible chat endpoint (soak tests, benchmarks).

``run_load(plan, base_url=..., api_key=..., models=[...])`` sends ``plan.requests`` chat completions in waves,
each wave holding its own number of requests in flight (1 to 256 by default), with random ``max_tokens``,
temperature, ``n``, stop strings and prompt lengths, spread over the served names (``name``, ``name@step``); a
fraction of the requests is abandoned by the client mid-flight (the connection is closed). After every wave it
checks that the server still answers. Every loop is bounded in count and time, and it only ever talks to
``base_url`` (keep that on 127.0.0.1). The ``LoadReport`` says what happened; ``report.problems()`` lists every
request that was not answered as it should have been, so a test asserts ``not report.problems()``.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_WAVES = (1, 8, 32, 65, 128, 256, 16, 100)
WORDS = ("sort", "these", "letters", "a", "b", "c", "d", "please", "answer", "now", "x", "y")


@dataclass(frozen=True)
class LoadPlan:
    """What to send: how many requests, in which waves of concurrency, and how varied."""

    requests: int = 2000
    waves: tuple[int, ...] = DEFAULT_WAVES  # requests in flight per wave; the requests are split evenly
    max_tokens: tuple[int, int] = (1, 64)  # drawn log-uniformly: mostly short, some long
    n: tuple[int, ...] = (1, 1, 1, 2, 4, 8)  # drawn uniformly from this list
    temperatures: tuple[float, ...] = (0.0, 1.0)
    prompt_words: tuple[int, int] = (1, 200)  # drawn log-uniformly
    stop_fraction: float = 0.2  # requests that send stop strings
    cancel_fraction: float = 0.1  # requests the client abandons after a random delay
    cancel_after_s: tuple[float, float] = (0.001, 0.5)
    request_timeout_s: float = 120.0  # an answer later than this counts as a hang
    ignore_eos: bool = False  # sample exactly max_tokens (vLLM's extension; benchmarks)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or not self.waves or min(self.waves) < 1:
            raise ValueError(f"requests={self.requests}, waves={self.waves}: need at least one of each")
        if self.requests < sum(self.waves):
            raise ValueError(
                f"requests={self.requests} cannot fill waves {self.waves}: give at least {sum(self.waves)}"
            )
        if not 0 <= self.cancel_fraction < 1:
            raise ValueError(f"cancel_fraction={self.cancel_fraction}: give a fraction in [0, 1)")


@dataclass
class LoadReport:
    """What the server did with the plan's requests (``to_json`` for one benchmark line)."""

    tried: int = 0
    answered: int = 0
    cancelled: int = 0
    completion_tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # status code (or exception name) -> count
    wrong_answers: list[str] = field(default_factory=list)  # 200s with the wrong number of choices, ...
    failed_probes: list[str] = field(default_factory=list)  # waves after which a single request failed
    latencies_s: list[float] = field(default_factory=list)
    max_in_flight: int = 0
    wall_s: float = 0.0

    def problems(self) -> list[str]:
        """Every way a request that was not cancelled failed to be answered correctly."""
        errors = [f"{count} x {what}" for what, count in sorted(self.errors.items())]
        return errors + self.wrong_answers[:20] + self.failed_probes

    def percentile(self, q: float) -> float:
        """Latency at quantile ``q`` of the answered requests (0 when none)."""
        ordered = sorted(self.latencies_s)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0

    def summary(self) -> dict[str, Any]:
        """The report as one flat JSON-able dict."""
        return {
            "tried": self.tried,
            "answered": self.answered,
            "cancelled": self.cancelled,
            "errors": dict(self.errors),
            "wrong_answers": len(self.wrong_answers),
            "failed_probes": len(self.failed_probes),
            "p50_s": round(self.percentile(0.5), 4),
            "p99_s": round(self.percentile(0.99), 4),
            "max_in_flight": self.max_in_flight,
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": round(self.completion_tokens / self.wall_s, 1) if self.wall_s else 0.0,
            "wall_s": round(self.wall_s, 2),
        }

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(self.summary())


@dataclass(frozen=True)
class _Request:
    body: dict[str, Any]
    cancel_after_s: float | None


def _requests(plan: LoadPlan, models: Sequence[str]) -> list[_Request]:
    rng = random.Random(plan.seed)
    made = []
    for i in range(plan.requests):
        words = round(math.exp(rng.uniform(*(math.log(w) for w in plan.prompt_words))))
        body: dict[str, Any] = {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=words))}],
            "max_tokens": round(math.exp(rng.uniform(*(math.log(t) for t in plan.max_tokens)))),
            "temperature": rng.choice(plan.temperatures),
            "n": rng.choice(plan.n),
            "logprobs": rng.random() < 0.5,
        }
        if plan.ignore_eos:
            body["ignore_eos"] = True
        if rng.random() < plan.stop_fraction:
            body["stop"] = rng.sample(["a", "b", " c", "\n"], k=rng.randint(1, 2))
        cancel = rng.uniform(*plan.cancel_after_s) if rng.random() < plan.cancel_fraction else None
        made.append(_Request(body, cancel))
    return made


class _Runner:
    def __init__(self, client: httpx.AsyncClient, url: str, report: LoadReport) -> None:
        self.client, self.url, self.report = client, url, report
        self.in_flight = 0

    async def send(self, request: _Request, timeout_s: float) -> None:
        report = self.report
        report.tried += 1
        self.in_flight += 1
        report.max_in_flight = max(report.max_in_flight, self.in_flight)
        started = time.monotonic()
        try:
            post = self.client.post(self.url, json=request.body)
            if request.cancel_after_s is not None:
                try:
                    response = await asyncio.wait_for(post, request.cancel_after_s)
                except TimeoutError:  # wait_for cancelled the request: httpx closes its connection
                    report.cancelled += 1
                    return
            else:
                response = await asyncio.wait_for(post, timeout_s)
        except TimeoutError:
            report.errors[f"no answer within {timeout_s:.0f} s"] += 1
            return
        except httpx.HTTPError as exc:
            report.errors[type(exc).__name__] += 1
            return
        finally:
            self.in_flight -= 1
        self._check(request, response, time.monotonic() - started)

    def _check(self, request: _Request, response: httpx.Response, latency_s: float) -> None:
        report = self.report
        if response.status_code != 200:
            report.errors[f"HTTP {response.status_code}: {response.text[:120]}"] += 1
            return
        choices = response.json().get("choices", [])
        if len(choices) != request.body["n"]:
            report.wrong_answers.append(f"asked n={request.body['n']}, got {len(choices)} choices")
            return
        report.answered += 1
        report.latencies_s.append(latency_s)
        report.completion_tokens += int(response.json().get("usage", {}).get("completion_tokens", 0))


async def _wave(runner: _Runner, requests: Sequence[_Request], concurrency: int, timeout_s: float) -> None:
    queue = list(reversed(requests))

    async def lane() -> None:
        while queue:
            await runner.send(queue.pop(), timeout_s)

    await asyncio.gather(*(lane() for _ in range(min(concurrency, len(requests)))))


async def run_load(
    plan: LoadPlan, *, base_url: str, api_key: str, models: Sequence[str], probe_model: str | None = None
) -> LoadReport:
    """Send ``plan`` to ``base_url`` (``.../v1``) over ``models``; after each wave one request must answer 200."""
    if not models:
        raise ValueError("models is empty; pass the served names to spread the requests over")
    report = LoadReport()
    requests = _requests(plan, models)
    extra = (len(requests) - sum(plan.waves)) // len(plan.waves)  # each wave can hold its concurrency
    bounds = [0]
    for concurrency in plan.waves:
        bounds.append(bounds[-1] + concurrency + extra)
    bounds[-1] = len(requests)
    limits = httpx.Limits(max_connections=max(plan.waves) + 8, max_keepalive_connections=max(plan.waves) + 8)
    headers = {"Authorization": f"Bearer {api_key}"}
    started = time.monotonic()
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=plan.request_timeout_s) as client:
        runner = _Runner(client, f"{base_url.rstrip('/')}/chat/completions", report)
        for index, concurrency in enumerate(plan.waves):
            chunk = requests[bounds[index] : bounds[index + 1]]
            await _wave(runner, chunk, concurrency, plan.request_timeout_s)
            probe = {
                "model": probe_model or models[0],
                "messages": [{"role": "user", "content": "still there?"}],
                "max_tokens": 2,
            }
            try:
                answer = await client.post(runner.url, json=probe, timeout=plan.request_timeout_s)
                if answer.status_code != 200:
                    report.failed_probes.append(f"after wave {index} (c={concurrency}): {answer.status_code}")
            except httpx.HTTPError as exc:
                report.failed_probes.append(f"after wave {index} (c={concurrency}): {exc!r}")
    report.wall_s = time.monotonic() - started
    return report


def summary_line(name: str, report: LoadReport, **extra: Any) -> str:
    """``{"target": name, ...report, ...extra}`` as one JSON line."""
    return json.dumps({"target": name, **report.summary(), **extra})


async def check_keep_alive(
    base_url: str, api_key: str, *, idle_s: float = 6.0, timeout_s: float = 30.0
) -> None:
    """Raise ``AssertionError`` unless the server keeps an idle keep-alive connection open for ``idle_s``.

    Clients keep idle connections in their pool for 5 s (httpx, the OpenAI client); a server that closes them
    at the same moment (uvicorn's default) now and then closes one a client is reusing: a ``ReadError`` on the
    client under load. The check sends ``GET /models`` twice on one connection, ``idle_s`` apart.
    """
    url = httpx.URL(base_url.rstrip("/") + "/models")
    host, port = url.host, url.port or 80
    request = (
        f"GET {url.raw_path.decode()} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {api_key}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(idle_s)
            writer.write(request)
            await writer.drain()
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
            except asyncio.IncompleteReadError:
                raise AssertionError(
                    f"{base_url}: the server closed an idle keep-alive connection within {idle_s} s; "
                    "keep idle connections longer than clients do (uvicorn: timeout_keep_alive)"
                ) from None
            status = head.split(b" ", 2)[1]
            if status != b"200":
                raise AssertionError(f"GET {url}: HTTP {status.decode()} ({head[:200]!r})")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is None:
                raise AssertionError(
                    f"GET {url}: the answer has no Content-Length; cannot reuse the connection"
                )
            await asyncio.wait_for(reader.readexactly(length), timeout_s)
    finally:
        writer.close()


__all__ = ["DEFAULT_WAVES", "LoadPlan", "LoadReport", "check_keep_alive", "run_load", "summary_line"]

"""The transformers engine under more concurrency than one batch holds, with clients that give up mid-flight.

Regression for the hang at the first validation: with more requests than ``max_batch_rows`` (64) in flight, the
worker admitted the first 64, and when that batch emptied it blocked on its queue although the rest were still
pending, so they waited until another request arrived (forever, in a validation pass).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import art_core as art
from art_local.backend import LocalBackend
from art_local.inference.batching import BatchWorker, EngineFailure
from art_local.inference.hf import HFEngine, HFEngineConfig
from art_local.inference.sampling import DecodeBatch
from art_local.inference.server import InferenceServer, create_app
from art_local.inference.service import InferenceService

USER: Any = [{"role": "user", "content": "Sort these letters: b c a"}]


@pytest.fixture
async def service(tiny_model_dir: Path) -> AsyncIterator[InferenceService]:
    service = InferenceService(engine="hf", device="cpu")
    await service.add_model(
        "agent", base_model=tiny_model_dir, step=0, weights=None, load_step=lambda s: None
    )
    yield service
    await service.close()


def engine_of(service: InferenceService) -> HFEngine:
    assert isinstance(service.engine, HFEngine)
    return service.engine


async def ask(client: openai.AsyncOpenAI, max_tokens: int, temperature: float) -> int:
    response = await client.chat.completions.create(
        model="agent", messages=USER, max_tokens=max_tokens, temperature=temperature, logprobs=True
    )
    return len(response.choices)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_more_requests_than_a_batch_holds_all_answer(
    service: InferenceService, temperature: float
) -> None:
    client = openai.AsyncOpenAI(base_url=service.base_url, api_key=service.api_key, max_retries=0, timeout=60)
    for round_ in range(3):
        answered = await asyncio.wait_for(
            asyncio.gather(*(ask(client, 4, temperature) for _ in range(100))), timeout=90
        )
        assert answered == [1] * 100, f"round {round_}"
    assert engine_of(service).pending_requests() == 0


async def test_clients_that_give_up_do_not_block_the_rest(service: InferenceService) -> None:
    """200 requests, a quarter abandoned by their client mid-flight; every other one answers, the queue drains."""
    client = openai.AsyncOpenAI(base_url=service.base_url, api_key=service.api_key, max_retries=0, timeout=60)
    impatient = openai.AsyncOpenAI(
        base_url=service.base_url, api_key=service.api_key, max_retries=0, timeout=0.05
    )
    kept = [asyncio.create_task(ask(client, 16, 1.0)) for _ in range(150)]
    given_up = await asyncio.gather(*(ask(impatient, 64, 1.0) for _ in range(50)), return_exceptions=True)
    assert all(isinstance(e, openai.APITimeoutError) for e in given_up)
    assert await asyncio.wait_for(asyncio.gather(*kept), timeout=90) == [1] * 150
    engine = engine_of(service)
    deadline = time.monotonic() + 10
    while engine.pending_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert engine.pending_requests() == 0
    # and the server still answers a single request afterwards
    assert await asyncio.wait_for(ask(client, 2, 0.0), timeout=30) == 1


async def test_a_disconnected_client_stops_its_work(service: InferenceService) -> None:
    """A client that leaves cancels its rows: far fewer decoding steps run than its request asked for."""
    engine = engine_of(service)
    before = engine.steps_run
    body = {
        "model": "agent",
        "messages": USER,
        "max_tokens": 2000,
        "n": 8,
        "temperature": 1.0,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {service.api_key}"}
    async with httpx.AsyncClient(timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{service.base_url}/chat/completions", json=body, headers=headers)
    deadline = time.monotonic() + 10
    while engine.pending_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert engine.pending_requests() == 0
    assert engine.steps_run - before < 1000, "the abandoned request decoded on after its client left"


@pytest.fixture
async def fragile(tiny_model_dir: Path) -> AsyncIterator[tuple[HFEngine, InferenceServer]]:
    """An engine whose watchdog gives up after 1 s without progress, behind a real server."""
    engine = HFEngine(HFEngineConfig(device="cpu", stall_timeout_s=1.0, watchdog_interval_s=0.1))
    await engine.add_model("agent", base_model=tiny_model_dir, step=0, weights=None, load_step=lambda s: None)

    def health() -> str | None:
        try:
            engine.check_healthy()
        except EngineFailure as exc:
            return str(exc)
        return None

    server = InferenceServer(create_app(engine, api_key="k", health=health))
    await server.start()
    yield engine, server
    await server.stop()
    await engine.close()


async def test_a_stuck_worker_fails_every_request_with_the_cause(
    fragile: tuple[HFEngine, InferenceServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, server = fragile
    stuck = threading.Event()
    monkeypatch.setattr(DecodeBatch, "step", lambda self: stuck.wait(20) and [])
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=15)
    try:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError, match="no progress") as waiting:
            await ask(client, 4, 1.0)
        assert waiting.value.status_code == 503 and time.monotonic() - started < 10
        with pytest.raises(openai.InternalServerError, match="no progress"):  # the next one fails at once
            await ask(client, 4, 1.0)
        async with httpx.AsyncClient() as http:
            health = await http.get(server.base_url.removesuffix("/v1") + "/health")
        assert health.status_code == 503 and "no progress" in health.text
        with pytest.raises(EngineFailure, match="stall_timeout_s"):
            engine.check_healthy()
    finally:
        stuck.set()


async def test_a_crashed_worker_fails_every_request_with_the_cause(
    fragile: tuple[HFEngine, InferenceServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, server = fragile

    def boom(self: BatchWorker) -> None:
        raise MemoryError("out of memory in the test")

    monkeypatch.setattr(BatchWorker, "_admit", boom)
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=15)
    for _ in range(2):  # the pending request, then the next one
        with pytest.raises(openai.InternalServerError, match="MemoryError: out of memory in the test"):
            await ask(client, 4, 1.0)


async def test_train_and_register_raise_the_engines_failure(tmp_path: Path, tiny_model_dir: Path) -> None:
    backend = LocalBackend(str(tmp_path / "art"), device="cpu", engine="hf")
    try:
        model = art.TrainableModel(name="agent", project="p", base_model=str(tiny_model_dir))
        await model.register(backend)
        engine = backend._service.engine if backend._service else None
        assert isinstance(engine, HFEngine)
        engine._worker.failure = EngineFailure("the inference worker crashed: MemoryError: test")
        with pytest.raises(EngineFailure, match="MemoryError: test"):
            await backend.train(model, [])
        other = art.TrainableModel(name="other", project="p", base_model=str(tiny_model_dir))
        with pytest.raises(EngineFailure, match="MemoryError: test"):
            await other.register(backend)
    finally:
        await backend.close()


async def test_heavy_requests_leave_the_event_loop_free(service: InferenceService) -> None:
    """A huge prompt is refused before tokenizing, and a big request does not stop /health from answering."""
    headers = {"Authorization": f"Bearer {service.api_key}"}
    root = service.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(timeout=120) as http:
        huge = {
            "model": "agent",
            "messages": [{"role": "user", "content": "abc " * 3_500_000}],
            "max_tokens": 1,
        }
        refused = await http.post(f"{service.base_url}/chat/completions", json=huge, headers=headers)
        assert refused.status_code == 400 and "at least" in refused.json()["error"]["message"]
        assert refused.json()["error"]["param"] == "messages"

        big = {
            "model": "agent",
            "messages": USER,
            "n": 32,
            "max_tokens": 96,
            "logprobs": True,
            "top_logprobs": 20,
            "ignore_eos": True,
        }
        work = asyncio.create_task(
            http.post(f"{service.base_url}/chat/completions", json=big, headers=headers)
        )
        answered_during = 0
        while not work.done():
            health = await http.get(f"{root}/health")
            assert health.status_code == 200
            answered_during += not work.done()
            await asyncio.sleep(0.05)
        assert (await work).status_code == 200
        assert answered_during >= 3, "/health did not answer while the big request was served"

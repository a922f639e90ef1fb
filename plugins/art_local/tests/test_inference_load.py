"""The transformers engine under more concurrency than one batch holds, with clients that give up mid-flight.

Regression for the hang at the first validation: with more requests than ``max_batch_rows`` (64) in flight, the
worker admitted the first 64, and when that batch emptied it blocked on its queue although the rest were still
pending, so they waited until another request arrived (forever, in a validation pass).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from art_local.inference.hf import HFEngine
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

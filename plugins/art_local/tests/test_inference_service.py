"""InferenceService with the transformers engine: steps, publishing, LRU reloads, lifecycle, batching."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from art_local.inference.hf import HFEngine
from art_local.inference.service import InferenceService, choose_engine
from art_local.tiny import build_tiny_model

USER: Any = [{"role": "user", "content": "Sort these letters: b c a"}]


@pytest.fixture(scope="module")
def tiny() -> Path:
    return build_tiny_model("tiny")


def weights_for(tiny: Path, seed: int) -> dict[str, torch.Tensor]:
    """The base weights with a re-drawn unembedding: a 'trained step' whose greedy output differs."""
    state = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).state_dict()
    generator = torch.Generator().manual_seed(seed)
    state["lm_head.weight"] = torch.randn(state["lm_head.weight"].shape, generator=generator) * 0.5
    return state


@pytest.fixture
async def service(tiny: Path) -> AsyncIterator[InferenceService]:
    service = InferenceService(engine="hf", device="cpu")
    await service.add_model("agent", base_model=tiny, step=0, weights=None, load_step=lambda step: None)
    yield service
    await service.close()


def client_for(service: InferenceService) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=service.base_url, api_key=service.api_key, max_retries=0)


async def greedy(client: openai.AsyncOpenAI, model: str, tokens: int = 12) -> list[str]:
    response = await client.chat.completions.create(
        model=model,
        messages=USER,
        temperature=0,
        max_tokens=tokens,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    content = response.choices[0].logprobs
    assert content is not None and content.content is not None
    return [t.token for t in content.content]


def hf_engine(service: InferenceService) -> HFEngine:
    assert isinstance(service.engine, HFEngine)
    return service.engine


async def test_openai_client_gets_n_choices_logprobs_and_seeded_samples(service: InferenceService) -> None:
    assert service.base_url.startswith("http://127.0.0.1:") and service.base_url.endswith("/v1")
    assert len(service.api_key) >= 32 and choose_engine("auto") == "hf"
    client = client_for(service)
    response = await client.chat.completions.create(
        model="agent", messages=USER, n=3, logprobs=True, top_logprobs=3, max_completion_tokens=6, seed=11
    )
    assert len(response.choices) == 3 and [c.index for c in response.choices] == [0, 1, 2]
    for choice in response.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        entries = choice.logprobs.content
        assert 1 <= len(entries) <= 6 and all(e.token.startswith("token_id:") for e in entries)
        assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
        assert choice.finish_reason in ("stop", "length")
    assert response.usage is not None
    assert response.usage.completion_tokens == sum(
        len(c.logprobs.content or []) for c in response.choices if c.logprobs
    )
    again = await client.chat.completions.create(
        model="agent@0", messages=USER, n=3, logprobs=True, max_completion_tokens=6, seed=11
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    assert len({c.message.content for c in response.choices}) > 1  # n draws, not n copies
    await client.close()


async def test_publish_serves_the_new_step_as_latest_while_old_steps_keep_their_output(
    service: InferenceService, tiny: Path
) -> None:
    client = client_for(service)
    before = await greedy(client, "agent")
    assert await greedy(client, "agent@0") == before
    await service.publish("agent", 1, weights_for(tiny, seed=1))
    after = await greedy(client, "agent")
    assert after != before
    assert await greedy(client, "agent@1") == after
    assert await greedy(client, "agent@0") == before
    assert [m.id for m in (await client.models.list()).data] == ["agent", "agent@0", "agent@1"]
    with pytest.raises(openai.NotFoundError, match="agent@2"):
        await greedy(client, "agent@2")  # a future step
    await client.close()


async def test_old_steps_are_evicted_then_reloaded_on_demand_and_forgotten_steps_are_gone(tiny: Path) -> None:
    kept = {s: weights_for(tiny, seed=s) for s in range(1, 5)}
    calls: list[int] = []

    def load_step(step: int) -> dict[str, torch.Tensor] | None:
        calls.append(step)
        return kept.get(step)

    service = InferenceService(engine="hf", device="cpu")
    await service.add_model("agent", base_model=tiny, step=0, weights=None, load_step=load_step)
    client = client_for(service)
    base = await greedy(client, "agent@0")
    for step in range(1, 5):
        await service.publish("agent", step, kept[step])
    outputs = {step: await greedy(client, f"agent@{step}") for step in (4, 3, 2)}
    assert sorted(hf_engine(service).describe()["models"]["agent"]["in_memory"]) == [
        2,
        3,
        4,
    ]  # latest + 2 recent
    assert calls == []
    reloaded = await greedy(client, "agent@1")
    assert calls == [1] and reloaded not in outputs.values()
    assert await greedy(client, "agent@2") == outputs[2]
    assert await greedy(client, "agent@0") == base  # not kept as a checkpoint: step 0 is the base model
    assert calls == [1, 0]
    await service.forget_steps("agent", keep=[2, 4])
    with pytest.raises(openai.NotFoundError):
        await greedy(client, "agent@1")
    with pytest.raises(openai.NotFoundError):
        await greedy(client, "agent@3")
    with pytest.raises(openai.NotFoundError):
        await greedy(client, "agent@0")
    assert calls == [1, 0]  # forgotten steps are refused without asking for their weights
    assert await greedy(client, "agent") == outputs[4]
    await client.close()
    await service.close()


async def test_registering_twice_is_idempotent_and_bad_weights_change_nothing(
    service: InferenceService, tiny: Path
) -> None:
    engine = hf_engine(service)
    module = engine.describe()
    await service.add_model("agent", base_model=tiny, step=0, weights=None, load_step=lambda step: None)
    assert engine.describe() == module
    with pytest.raises(ValueError, match="already served from"):
        await service.add_model(
            "agent",
            base_model=build_tiny_model("tiny", seed=1),
            step=0,
            weights=None,
            load_step=lambda s: None,
        )
    broken = {"not.a.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"not\.a\.weight.*merged state dict"):
        await service.publish("agent", 1, broken)
    partial = dict(weights_for(tiny, seed=1))
    del partial["model.norm.weight"]
    with pytest.raises(ValueError, match=r"lack \['model\.norm\.weight'\]"):
        await service.publish("agent", 1, partial)
    assert engine.describe() == module
    with pytest.raises(LookupError, match="'stranger' is not served"):
        await service.publish("stranger", 1, weights_for(tiny, seed=1))


async def test_close_stops_the_server_frees_the_port_and_the_service_can_start_again(tiny: Path) -> None:
    service = InferenceService(engine="hf", device="cpu")
    await service.start()
    await service.start()  # idempotent
    url = service.base_url
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    await service.close()
    await service.close()  # idempotent
    with pytest.raises(RuntimeError, match="has not started"):
        _ = service.base_url
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"{url}/models")
    with socket.socket() as sock:  # the port is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    again = InferenceService(engine="hf", device="cpu", port=port)
    await again.add_model("agent", base_model=tiny, step=0, weights=None, load_step=lambda step: None)
    assert again.base_url == url
    assert await greedy(client_for(again), "agent", tokens=2)
    await again.close()


async def decoding_started(engine: HFEngine, batches_before: int, timeout_s: float = 10.0) -> None:
    """Wait until the engine has admitted a batch after ``batches_before`` (the requests are decoding)."""
    deadline = time.monotonic() + timeout_s
    while engine.batches_run <= batches_before:
        assert time.monotonic() < deadline, "no batch started decoding"
        await asyncio.sleep(0.005)


async def test_requests_in_flight_finish_on_the_weights_they_started_with(
    service: InferenceService, tiny: Path
) -> None:
    client = client_for(service)
    old = await greedy(client, "agent", tokens=120)
    engine = hf_engine(service)
    steps_before = engine.batches_run
    inflight = [asyncio.create_task(greedy(client, "agent", tokens=120)) for _ in range(6)]
    await decoding_started(engine, steps_before)
    await service.publish("agent", 1, weights_for(tiny, seed=1))
    new = await greedy(client, "agent", tokens=120)
    results = await asyncio.gather(*inflight)
    assert new != old
    assert all(r in (old, new) for r in results)  # never a crash, never a mix
    assert results.count(old) >= 1
    await client.close()


async def test_concurrent_requests_are_decoded_together(service: InferenceService) -> None:
    client = client_for(service)
    await greedy(client, "agent", tokens=2)
    worker = cast(Any, hf_engine(service))._worker
    steps_before = worker.steps_run
    await asyncio.gather(*(greedy(client, "agent", tokens=16) for _ in range(8)))
    assert worker.steps_run - steps_before < 8 * 16  # alone, each request would need 16 steps of its own
    await client.close()


async def test_publish_reuses_evicted_modules_but_never_one_a_request_still_decodes_on(tiny: Path) -> None:
    kept = {s: weights_for(tiny, seed=s) for s in range(1, 7)}
    service = InferenceService(engine="hf", device="cpu")
    await service.add_model("agent", base_model=tiny, step=0, weights=None, load_step=kept.get)
    client, engine = client_for(service), hf_engine(service)
    expected = {}
    for step in (1, 5, 6):  # each step's own output, from a module that was never reused
        await service.add_model(
            f"ref{step}", base_model=tiny, step=step, weights=kept[step], load_step=kept.get
        )
        expected[step] = await greedy(client, f"ref{step}", tokens=400)
    base = await greedy(client, "agent@0", tokens=400)
    await service.publish("agent", 1, kept[1])
    await service.publish("agent", 2, kept[2])
    started = engine.batches_run
    inflight = [asyncio.create_task(greedy(client, "agent@0", tokens=400)) for _ in range(4)]
    await decoding_started(engine, started)
    for step in (3, 4, 5, 6):  # step 0 leaves memory (evicted at 5) while its requests still decode
        await service.publish("agent", step, kept[step])
    assert not any(task.done() for task in inflight)
    assert engine.describe()["models"]["agent"]["in_memory"] == [4, 5, 6]
    assert await asyncio.gather(*inflight) == [base] * 4  # never a mix of weights
    assert engine.modules_reused == 3  # steps 1, 2 and 3 gave their memory; step 0 was held
    assert await greedy(client, "agent", tokens=400) == expected[6]
    assert await greedy(client, "agent@5", tokens=400) == expected[5]
    assert await greedy(client, "agent@1", tokens=400) == expected[1]  # reloaded through load_step
    await client.close()
    await service.close()

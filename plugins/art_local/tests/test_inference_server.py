"""The HTTP server over any Engine: auth, limits, OpenAI error shapes, tool calls, start-up errors.

``ScriptedEngine`` is a complete third-party engine in a few lines (what ``art_tinker`` does with its own
sampler): it answers from a script with the real tiny tokenizer, so tool calls can be asserted exactly.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from art_local.inference.engine import Completion, Engine, SamplingParams, ServedModel, UnknownModelError
from art_local.inference.server import InferenceServer, create_app
from art_local.tiny import build_tiny_model

KEY = "test-key-123"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


class ScriptedEngine:
    """Serves ``scripted`` and ``scripted@1``; every completion is ``reply`` tokenized, then eos."""

    def __init__(self, reply: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(build_tiny_model("tiny"))
        self.reply = reply
        self.prompts: list[list[int]] = []

    def served_models(self) -> list[ServedModel]:
        return [ServedModel(n, self.tokenizer, 2048, 1) for n in ("scripted", "scripted@1")]

    def resolve(self, model: str) -> ServedModel:
        for served in self.served_models():
            if served.name == model:
                return served
        raise UnknownModelError(model, [s.name for s in self.served_models()])

    async def generate(
        self, model: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> list[Completion]:
        self.resolve(model)
        self.prompts.append(list(prompt_token_ids))
        ids = (*self.tokenizer.encode(self.reply, add_special_tokens=False), self.tokenizer.eos_token_id)
        ids = ids[: params.max_tokens]
        finish = "stop" if len(ids) and ids[-1] == self.tokenizer.eos_token_id else "length"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return [Completion(ids, tuple(-0.25 for _ in ids), (), text, finish) for _ in range(params.n)]


async def serve(engine: Engine, **options: Any) -> AsyncIterator[InferenceServer]:
    server = InferenceServer(create_app(engine, api_key=KEY, **options))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedEngine, InferenceServer]]:
    engine = ScriptedEngine(
        'Checking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    async for server in serve(engine, max_body_bytes=4096):
        yield engine, server


def test_the_scripted_engine_satisfies_the_protocol() -> None:
    assert isinstance(ScriptedEngine("x"), Engine)


async def test_openai_client_gets_tool_calls_logprobs_and_usage(
    scripted: tuple[ScriptedEngine, InferenceServer],
) -> None:
    engine, server = scripted
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "Weather in Oslo?"}]
    response = await client.chat.completions.create(
        model="scripted@1", messages=messages, tools=cast(Any, TOOLS), logprobs=True, n=2
    )
    assert len(response.choices) == 2
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert choice.message.tool_calls is not None
    call = cast(Any, choice.message.tool_calls[0])
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert choice.logprobs.content[-1].token == f"token_id:{engine.tokenizer.eos_token_id}"
    assert response.usage is not None and response.usage.prompt_tokens == len(engine.prompts[-1])
    assert response.usage.completion_tokens == 2 * len(choice.logprobs.content)
    rendered = engine.tokenizer.decode(engine.prompts[-1])
    assert "get_weather" in rendered and rendered.endswith("<|im_start|>assistant\n")
    without_tools = await client.chat.completions.create(model="scripted", messages=messages)
    assert (
        without_tools.choices[0].finish_reason == "stop" and not without_tools.choices[0].message.tool_calls
    )
    assert without_tools.choices[0].logprobs is None
    models = await client.models.list()
    assert [m.id for m in models.data] == ["scripted", "scripted@1"]
    await client.close()


async def test_api_key_is_required_on_v1_but_not_on_health(
    scripted: tuple[ScriptedEngine, InferenceServer],
) -> None:
    _, server = scripted
    root = server.base_url.removesuffix("/v1")
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{root}/health")).json() == {"status": "ok"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            answer = await http.get(f"{server.base_url}/models", headers=headers)
            assert answer.status_code == 401
            assert answer.json()["error"]["code"] == "invalid_api_key"
        ok = await http.get(f"{server.base_url}/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()


async def test_bad_requests_get_openai_error_shapes(scripted: tuple[ScriptedEngine, InferenceServer]) -> None:
    _, server = scripted
    url = f"{server.base_url}/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    user = [{"role": "user", "content": "hi"}]
    async with httpx.AsyncClient() as http:
        malformed = await http.post(url, content=b"{not json", headers=auth)
        missing = await http.post(url, json={"model": "scripted"}, headers=auth)
        unknown = await http.post(url, json={"model": "other@3", "messages": user}, headers=auth)
        too_long = await http.post(
            url, json={"model": "scripted", "messages": user, "max_tokens": 5000}, headers=auth
        )
        declared = await http.post(url, content=b"x" * 5000, headers=auth)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        streamed = await http.post(url, content=chunks(), headers=auth)
    for answer, status in (
        (malformed, 400),
        (missing, 400),
        (unknown, 404),
        (too_long, 400),
        (declared, 413),
        (streamed, 413),
    ):
        assert answer.status_code == status, answer.text
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert "messages" in missing.json()["error"]["message"]
    assert (
        "other@3" in unknown.json()["error"]["message"] and "scripted@1" in unknown.json()["error"]["message"]
    )
    assert "at most 2" in too_long.json()["error"]["message"]
    assert "4096 bytes" in declared.json()["error"]["message"]


async def test_server_stop_frees_the_port_for_a_new_server() -> None:
    engine = ScriptedEngine("ok")
    first = InferenceServer(create_app(engine, api_key=KEY))
    await first.start()
    port = first.port
    await first.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/health")
    second = InferenceServer(create_app(engine, api_key=KEY), port=port)
    await second.start()
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}.*pick another port"):
        await InferenceServer(create_app(engine, api_key=KEY), port=port).start()
    await second.stop()


async def test_start_up_failure_surfaces_the_servers_own_error_text() -> None:
    server = InferenceServer(cast(Any, "art_no_such_module_xyz:app"))  # uvicorn cannot import it
    with pytest.raises(RuntimeError, match='Could not import module "art_no_such_module_xyz"'):
        await server.start(timeout_s=30)


def test_an_empty_api_key_is_refused() -> None:
    with pytest.raises(ValueError, match="api_key is empty"):
        create_app(ScriptedEngine("x"), api_key="")

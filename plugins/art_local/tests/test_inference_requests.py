"""Request validation over real HTTP: each bad value is a 400 (or 404) naming the field, never a 5xx or a 200."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from art_local.inference.engine import Completion, SamplingParams, ServedModel, UnknownModelError
from art_local.inference.server import InferenceServer, create_app
from art_local.tiny import build_tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")  # one server for the module

KEY = "test-key-requests"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


class EchoEngine:
    """Serves ``echo`` and ``echo@1``; answers one eos token per completion and counts the requests it got."""

    def __init__(self) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(build_tiny_model("tiny"))
        self.generated = 0

    def served_models(self) -> list[ServedModel]:
        return [ServedModel(name, self.tokenizer, 2048, 1) for name in ("echo", "echo@1")]

    def resolve(self, model: str) -> ServedModel:
        for served in self.served_models():
            if served.name == model:
                return served
        raise UnknownModelError(model, [s.name for s in self.served_models()])

    async def generate(
        self, model: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> list[Completion]:
        self.resolve(model)
        self.generated += 1
        eos = self.tokenizer.eos_token_id
        return [Completion((eos,), (-0.5,), (), "", "stop") for _ in range(params.n)]


@pytest.fixture(scope="module")
def engine() -> EchoEngine:
    return EchoEngine()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url(engine: EchoEngine) -> AsyncIterator[str]:
    server = InferenceServer(create_app(engine, api_key=KEY))
    await server.start()
    try:
        yield f"{server.base_url}/chat/completions"
    finally:
        await server.stop()


async def post(url: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"})


# (fields over {"model": "echo", "messages": USER}, words the error message must hold)
BAD_REQUESTS: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    # messages
    ({"messages": [{"role": "banana", "content": "hi"}]}, ("messages[0].role", "'banana'", "user")),
    ({"messages": [{"content": "hi"}]}, ("messages[0].role",)),
    ({"messages": [{"role": 5, "content": "hi"}]}, ("messages[0].role", "int")),
    (
        {"messages": [{"role": "user", "content": {"text": "hi"}}]},
        ("messages[0].content", "dict", "text parts"),
    ),
    ({"messages": [{"role": "user", "content": 5}]}, ("messages[0].content", "int")),
    ({"messages": [{"role": "user"}]}, ("messages[0].content", "missing")),
    ({"messages": [{"role": "user", "content": None}]}, ("messages[0].content",)),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        ("content[0]", "image_url"),
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        ("content[0]", "text parts"),
    ),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, ("content[0]", "str")),
    ({"messages": [*USER, {"role": "tool", "content": "42"}]}, ("messages[1].tool_call_id",)),
    (
        {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
        ("messages[0].tool_calls", "assistant"),
    ),
    ({"messages": [{"role": "user", "content": "hi", "name": 5}]}, ("messages[0].name", "string")),
    ({"messages": ["hi"]}, ("messages",)),
    ({"messages": []}, ("messages",)),
    ({"messages": "hi"}, ("messages",)),
    # types are strict: a string is never a number or a boolean
    ({"logprobs": "yes"}, ("logprobs", "boolean")),
    ({"logprobs": 1}, ("logprobs", "boolean")),
    ({"ignore_eos": "true"}, ("ignore_eos",)),
    ({"max_tokens": "5"}, ("max_tokens",)),
    ({"max_tokens": 5.5}, ("max_tokens",)),
    ({"n": "2"}, ("n",)),
    ({"n": True}, ("n",)),
    ({"temperature": "hot"}, ("temperature",)),
    ({"seed": "7"}, ("seed",)),
    # ranges
    ({"temperature": 3.0}, ("temperature",)),
    ({"temperature": -1}, ("temperature",)),
    ({"top_p": 0}, ("top_p",)),
    ({"top_p": 1.5}, ("top_p",)),
    ({"max_tokens": 0}, ("max_tokens",)),
    ({"max_tokens": 10**30}, ("max_tokens",)),
    ({"max_completion_tokens": -1}, ("max_completion_tokens",)),
    ({"n": 0}, ("n",)),
    ({"n": 129}, ("n",)),
    ({"seed": 10**30}, ("seed",)),
    ({"top_logprobs": 21, "logprobs": True}, ("top_logprobs",)),
    ({"top_logprobs": 3}, ("top_logprobs needs logprobs",)),
    ({"stop": [""]}, ("stop",)),
    ({"stop": ["s"] * 17}, ("stop", "16")),
    ({"stop": 5}, ("stop",)),
    # options this server does not implement
    ({"stream": True}, ("stream",)),
    ({"frequency_penalty": 0.5}, ("frequency_penalty",)),
    ({"presence_penalty": 0.5}, ("presence_penalty",)),
    ({"logit_bias": {"5": 1.0}}, ("logit_bias",)),
    ({"tool_choice": "required"}, ("tool_choice",)),
    ({"surprise": 1}, ("surprise",)),
    # tools
    ({"tools": [5]}, ("tools",)),
    ({"tools": [{"type": "function"}]}, ("tools[0]", "function")),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, ("tools[0].function.name",)),
    # names
    ({"model": "probe@" + "9" * 5000}, ("model", "5006 characters")),
    ({"model": "echo@" + "9" * 40}, ("model", "40 digits")),
    ({"model": ""}, ("model",)),
    ({"model": 5}, ("model",)),
]


@pytest.mark.parametrize(("fields", "words"), BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
async def test_a_bad_value_is_a_400_naming_the_field(
    url: str, engine: EchoEngine, fields: dict[str, Any], words: tuple[str, ...]
) -> None:
    generated = engine.generated
    answer = await post(url, {"model": "echo", "messages": USER, **fields})
    assert answer.status_code == 400, (fields, answer.status_code, answer.text[:300])
    error = answer.json()["error"]
    text = f"{error['message']} {error['param']}"
    for word in words:
        assert word in text, (word, error)
    assert engine.generated == generated, "a refused request reached the engine"


@pytest.mark.parametrize("model", ["probe@12", "echo@2", "nobody", "echo@" + "9" * 18, "a" * 256])
async def test_an_unknown_but_well_formed_name_is_a_404(url: str, model: str) -> None:
    answer = await post(url, {"model": model, "messages": USER})
    assert answer.status_code == 404, answer.text[:300]
    assert answer.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model": "echo@1"},
        {"logprobs": True, "top_logprobs": 2, "temperature": 0, "top_p": 1, "seed": -(2**63), "n": 2},
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *USER]},
        {"messages": [{"role": "developer", "content": "Be brief."}, *USER]},
        {
            "tools": [TOOL],
            "messages": [
                *USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
        },
        {"stop": "x", "max_completion_tokens": 3, "user": "u", "metadata": {"k": "v"}, "store": False},
    ],
)
async def test_good_requests_are_still_answered(url: str, fields: dict[str, Any]) -> None:
    answer = await post(url, {"model": "echo", "messages": USER, **fields})
    assert answer.status_code == 200, answer.text[:300]
    assert len(answer.json()["choices"]) == fields.get("n", 1)

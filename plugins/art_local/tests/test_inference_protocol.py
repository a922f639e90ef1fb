"""The OpenAI wire format: request validation, prompt rendering, tool-call parsing, token bytes."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from transformers import AutoTokenizer

from art_local.inference.engine import Completion, ServedModel, split_step_name
from art_local.inference.protocol import (
    ChatCompletionRequest,
    RequestError,
    chat_completion_response,
    parse_tool_calls,
    render_prompt,
    sampling_params,
    token_bytes,
)
from art_local.tiny import build_tiny_model

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return ServedModel("agent@2", AutoTokenizer.from_pretrained(build_tiny_model("tiny")), 64, 0)


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "agent@2", "messages": USER, **fields})


def test_step_names_split_only_on_a_trailing_integer() -> None:
    assert split_step_name("agent@12") == ("agent", 12)
    assert split_step_name("agent") == ("agent", None)
    assert split_step_name("a@b@3") == ("a@b", 3)
    assert split_step_name("agent@latest") == ("agent@latest", None)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"surprise": 1}, "surprise"),
        ({"stream": True}, "stream"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
        ({"temperature": 3.0}, "temperature"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
        ({"messages": []}, "messages"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_requests_the_server_cannot_honour_are_refused_by_name(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=needle):
        request(**fields)


def test_sampling_params_follow_the_request_and_the_context(served: ServedModel) -> None:
    params = sampling_params(
        served, request(max_completion_tokens=5, temperature=0.3, top_p=0.5, n=3, seed=9, stop="x"), 10
    )
    assert (params.max_tokens, params.temperature, params.top_p, params.n, params.seed, params.stop) == (
        5, 0.3, 0.5, 3, 9, ("x",)
    )  # fmt: skip
    assert sampling_params(served, request(), 10).max_tokens == 54  # the rest of the context by default
    with pytest.raises(RequestError, match="ask for at most 54"):
        sampling_params(served, request(max_tokens=55), 10)
    with pytest.raises(RequestError, match="shorten the messages"):
        sampling_params(served, request(), 64)


def test_prompt_is_the_chat_template_with_tools_and_generation_prompt(served: ServedModel) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    ids = render_prompt(served, request(tools=tools))
    expected = served.tokenizer.apply_chat_template(
        USER, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert served.tokenizer.decode(ids) == expected
    assert "get_weather" in expected and expected.endswith("<|im_start|>assistant\n")


def test_tool_calls_are_parsed_into_openai_tool_calls() -> None:
    text = 'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}
    only, two = parse_tool_calls(
        '<tool_call>{"name": "a", "arguments": "{}"}</tool_call><tool_call>{"name": "b"}</tool_call>'
    )
    assert only is None and [c["function"]["name"] for c in two] == ["a", "b"]
    assert two[0]["function"]["arguments"] == "{}" and two[1]["function"]["arguments"] == "{}"
    broken = 'x <tool_call>{"name": oops}</tool_call>'
    assert parse_tool_calls(broken) == (broken, [])
    assert parse_tool_calls("plain answer") == ("plain answer", [])


def test_token_bytes_reassemble_the_exact_utf8_text(served: ServedModel) -> None:
    text = "Tokyo é 北 🙂 <tool_call>"
    ids = served.tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(bytes(token_bytes(served.tokenizer, i)) for i in ids) == text.encode()
    eos = served.tokenizer.eos_token_id
    assert bytes(token_bytes(served.tokenizer, eos)) == b"<|im_end|>"


def test_response_has_openai_shape_token_id_logprobs_and_usage(served: ServedModel) -> None:
    tokenizer = served.tokenizer
    call = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    ids = tuple(tokenizer.encode(call, add_special_tokens=False)) + (tokenizer.eos_token_id,)
    completion = Completion(ids, tuple(-0.5 for _ in ids), tuple(((i, -0.1),) for i in ids), call, "stop")
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = chat_completion_response(
        served, request(tools=tools, logprobs=True, top_logprobs=1), 7, [completion]
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'
    tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
    assert tokens == [f"token_id:{i}" for i in ids]
    assert choice["logprobs"]["content"][0]["top_logprobs"][0]["token"] == f"token_id:{ids[0]}"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": len(ids), "total_tokens": 7 + len(ids)}
    plain = chat_completion_response(served, request(), 7, [completion])["choices"][0]
    assert (
        plain["message"]["content"] == call and plain["finish_reason"] == "stop" and plain["logprobs"] is None
    )


def test_openai_client_types_accept_the_response(served: ServedModel) -> None:
    from openai.types.chat import ChatCompletion

    completion = Completion((5, 6), (-1.0, -2.0), (), "ab", "length")
    parsed = ChatCompletion.model_validate(
        chat_completion_response(served, request(logprobs=True), 3, [completion])
    )
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.content is not None
    assert [t.token for t in parsed.choices[0].logprobs.content] == ["token_id:5", "token_id:6"]
    assert parsed.choices[0].finish_reason == "length"

"""OpenAI chat-completions wire format: the request model, prompt rendering and the response built from
engine completions (tool calls parsed back from ``<tool_call>{json}</tool_call>``; logprob tokens are
``"token_id:<id>"``)."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from art_local.inference.engine import Completion, SamplingParams, ServedModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class RequestError(ValueError):
    """A request the server refuses with 400; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# Served names are model names (at most 128 characters) plus "@{step}"; anything longer is not one of ours, and
# a step of thousands of digits would make int() raise instead of answering 404.
MAX_MODEL_NAME_LENGTH = 256
MAX_STEP_DIGITS = 18
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_TEXT_PART_TYPES = frozenset({"text", "refusal"})


def _check_content(content: object, where: str, *, nullable: bool) -> None:
    if content is None:
        if not nullable:
            raise ValueError(f"{where}.content is missing; give the message's text as a string")
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(
            f"{where}.content is a {type(content).__name__}; it must be a string or a list of text parts "
            '([{"type": "text", "text": "..."}])'
        )
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PART_TYPES or not isinstance(part.get(kind), str):
            shown = kind if isinstance(kind, str) else type(part).__name__
            raise ValueError(
                f"{where}.content[{index}] is {shown[:40]!r}; this server takes text parts only "
                '({"type": "text", "text": "..."})'
            )


def check_message(message: dict[str, Any], where: str) -> None:
    """One chat message: a known role, text content, and the fields that role needs, each of the right type."""
    role = message.get("role")
    if role not in ROLES:
        shown = repr(role)[:60] if isinstance(role, str) else f"a {type(role).__name__}"
        raise ValueError(f"{where}.role is {shown}; it must be one of {', '.join(ROLES)}")
    calls = message.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list)):
        raise ValueError(f"{where}.tool_calls must be a list, on an assistant message only")
    _check_content(message.get("content"), where, nullable=role == "assistant")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise ValueError(f"{where}.tool_call_id is missing; a tool message answers a tool call by its id")
    for key in ("name", "tool_call_id"):
        if key in message and not isinstance(message[key], str | None):
            raise ValueError(f"{where}.{key} is a {type(message[key]).__name__}; it must be a string")


def check_tool(tool: dict[str, Any], where: str) -> None:
    """One tool: ``{"type": "function", "function": {"name": str, ...}}``."""
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        raise ValueError(
            f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}'
        )
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"{where}.function.name is missing; name the function")


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` that this server accepts.

    Strict: a string is never read as a number or a boolean (``logprobs: "yes"`` is a 400), and each message
    is checked (role, content) so a request is answered as sent or refused naming the field.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: Literal[False] = False
    ignore_eos: bool = False  # vLLM's extension: keep sampling past eos (benchmarks)
    # accepted only at their neutral values, so a request never silently gets something other than it asked
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0)
    # ignored: they do not change what is sampled
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None

    @field_validator("model")
    @classmethod
    def _servable_name(cls, value: str) -> str:
        if len(value) > MAX_MODEL_NAME_LENGTH:
            raise ValueError(
                f"model name of {len(value)} characters is not served here (names have at most "
                f"{MAX_MODEL_NAME_LENGTH}); pass model.get_inference_name() or an id from GET /v1/models"
            )
        _, at, step = value.rpartition("@")
        if at and step.isdigit() and len(step) > MAX_STEP_DIGITS:
            raise ValueError(
                f"the step of model {value[:60]!r}... has {len(step)} digits; steps have at most 18"
            )
        return value

    @field_validator("messages")
    @classmethod
    def _valid_messages(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, message in enumerate(value):
            check_message(message, f"messages[{index}]")
        return value

    @field_validator("tools")
    @classmethod
    def _valid_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for index, tool in enumerate(value or ()):
            check_tool(tool, f"tools[{index}]")
        return value

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        stops = self.stop_strings()
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError(f"stop {self.stop!r}: give at most 16 non-empty strings")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple of strings."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def render_prompt(served: ServedModel, request: ChatCompletionRequest) -> list[int]:
    """The prompt token ids: messages and tools through the model's chat template, generation prompt added."""
    try:
        text = served.tokenizer.apply_chat_template(
            request.messages,
            tools=cast(Any, request.tools),
            add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as exc:  # jinja errors: a message the template cannot render
        raise RequestError(
            f"the chat template of {served.name!r} cannot render these messages: {exc}", "messages"
        ) from exc
    assert isinstance(text, str)
    ids: list[int] = served.tokenizer.encode(text, add_special_tokens=False)
    return ids


def sampling_params(
    served: ServedModel, request: ChatCompletionRequest, prompt_tokens: int
) -> SamplingParams:
    """The engine's sampling options for this request; the context length bounds the completion."""
    room = served.context_length - prompt_tokens
    if room < 1:
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens and {served.name!r} accepts {served.context_length} in all; "
            "shorten the messages",
            "messages",
        )
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked > room:
        raise RequestError(
            f"max_tokens={asked} plus the prompt's {prompt_tokens} tokens exceeds the context length "
            f"{served.context_length} of {served.name!r}; ask for at most {room}",
            "max_tokens",
        )
    return SamplingParams(
        max_tokens=asked or room,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        n=request.n,
        seed=request.seed,
        stop=request.stop_strings(),
        top_logprobs=request.top_logprobs or 0,
        ignore_eos=request.ignore_eos,
    )


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks out of ``text``.

    Returns the remaining content (None when empty) and OpenAI ``tool_calls``; when any block is not valid
    JSON with a string ``name``, nothing is parsed and the text stays content.
    """
    blocks = _TOOL_CALL.findall(text)
    calls: list[dict[str, Any]] = []
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", {})
        calls.append(
            {
                "id": f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
        )
    content = _TOOL_CALL.sub("", text).strip() if calls else text
    return (content or None) if calls else text, calls


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's byte → printable-character map (GPT-2 convention)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()


@lru_cache(maxsize=8)
def _token_bytes_table(tokenizer: PreTrainedTokenizerBase) -> dict[int, list[int]]:
    return {}


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> list[int]:
    """The raw bytes of one token (exact for byte-level BPE, the decoded text's UTF-8 otherwise)."""
    table = _token_bytes_table(tokenizer)
    if token_id not in table:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if (
            isinstance(piece, str)
            and piece
            and all(ch in _BYTE_DECODER for ch in piece)
            and (token_id not in tokenizer.all_special_ids)
        ):
            table[token_id] = [_BYTE_DECODER[ch] for ch in piece]
        else:
            text = tokenizer.decode([token_id], skip_special_tokens=False)
            table[token_id] = list(str(text).encode("utf-8"))
    return table[token_id]


def _logprob_entry(tokenizer: PreTrainedTokenizerBase, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": f"token_id:{token_id}", "logprob": logprob, "bytes": token_bytes(tokenizer, token_id)}


def _logprobs(tokenizer: PreTrainedTokenizerBase, completion: Completion) -> dict[str, Any]:
    content = []
    for t, (token_id, logprob) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        tops = completion.top_logprobs[t] if completion.top_logprobs else ()
        entry = _logprob_entry(tokenizer, token_id, logprob)
        entry["top_logprobs"] = [_logprob_entry(tokenizer, i, lp) for i, lp in tops]
        content.append(entry)
    return {"content": content, "refusal": None}


def _choice(
    index: int, served: ServedModel, request: ChatCompletionRequest, completion: Completion
) -> dict[str, Any]:
    content: str | None = completion.text
    tool_calls: list[dict[str, Any]] = []
    if request.tools and request.tool_choice != "none":
        content, tool_calls = parse_tool_calls(completion.text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    finish = "tool_calls" if tool_calls and completion.finish_reason == "stop" else completion.finish_reason
    return {
        "index": index,
        "message": message,
        "logprobs": _logprobs(served.tokenizer, completion) if request.logprobs else None,
        "finish_reason": finish,
    }


def chat_completion_response(
    served: ServedModel, request: ChatCompletionRequest, prompt_tokens: int, completions: Sequence[Completion]
) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` object for these completions."""
    completion_tokens = sum(len(c.token_ids) for c in completions)
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [_choice(i, served, request, c) for i, c in enumerate(completions)],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }

"""One conversation (messages and Choices) → token ids with the trained positions and the sampler's logprobs.

The context is rendered with the tokenizer's chat template (tools included). Each trainable ``Choice``
contributes exactly the token ids it was sampled with, parsed from its logprob tokens ``"token_id:<id>"``; the
template text around it is tokenized as the inference server tokenized its prompt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from art_core.plugin_api import is_choice

_SENTINEL = "\u2063<art-trained-choice-{}>\u2063"
TOKEN_ID_PREFIX = "token_id:"


@dataclass(frozen=True)
class TokenizedHistory:
    """Token ids of one conversation, which of them are trained, and the sampler's logprob of each (NaN = unknown)."""

    tokens: tuple[int, ...]
    trained: tuple[bool, ...]
    logprobs: tuple[float, ...]
    choices_without_logprobs: int = 0

    @property
    def num_trained(self) -> int:
        """How many tokens are trained."""
        return sum(self.trained)


def choice_token_ids(choice: Any, tokenizer: Any, *, where: str) -> tuple[list[int], list[float]] | None:
    """The sampled token ids and logprobs of a ``Choice`` (None when it carries no logprobs)."""
    logprobs = getattr(choice, "logprobs", None)
    entries = list((logprobs.content or logprobs.refusal or []) if logprobs is not None else [])
    if not entries:
        return None
    vocab_size = len(tokenizer)
    ids: list[int] = []
    for position, entry in enumerate(entries):
        token = entry.token
        if token.startswith(TOKEN_ID_PREFIX):
            try:
                token_id = int(token[len(TOKEN_ID_PREFIX) :])
            except ValueError:
                token_id = -1
        else:
            mapped = tokenizer.convert_tokens_to_ids(token)
            token_id = mapped if isinstance(mapped, int) and mapped != tokenizer.unk_token_id else -1
        if not 0 <= token_id < vocab_size:
            raise ValueError(
                f"{where}: logprob token {position} is {token!r}, which is neither 'token_id:<id>' with an id below "
                f"{vocab_size} nor a token of this tokenizer; sample from an endpoint that returns token ids (art's "
                "servers do; vLLM: --return-tokens-as-token-ids) with the same tokenizer as the trained model"
            )
        ids.append(token_id)
    return ids, [float(entry.logprob) for entry in entries]


def _as_message(item: Any) -> dict[str, Any]:
    if not is_choice(item):
        return dict(item)
    message: dict[str, Any] = {"role": "assistant", "content": item.message.content or ""}
    if item.message.tool_calls:
        message["tool_calls"] = [call.model_dump(mode="json") for call in item.message.tool_calls]
    return message


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: Sequence[Any] | None,
    cache: dict[Any, Any] | None = None,
) -> str:
    key = (
        ("render", json.dumps([messages, tools], sort_keys=True, default=repr)) if cache is not None else None
    )
    if cache is not None and key in cache:
        return cache[key]  # type: ignore[no-any-return]
    text = tokenizer.apply_chat_template(messages, tools=list(tools) if tools else None, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"the chat template rendered a {type(text).__name__}, not text")
    if cache is not None:
        cache[key] = text
    return text


def _encode(tokenizer: Any, text: str, cache: dict[Any, Any] | None) -> list[int]:
    if cache is not None and ("encode", text) in cache:
        return cache["encode", text]  # type: ignore[no-any-return]
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False) if text else []
    if cache is not None:
        cache["encode", text] = ids
    return ids


def _content_token_ids(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Sequence[Any] | None, index: int, choice: Any
) -> list[int]:
    """Tokens of a Choice without logprobs: the template's rendering of its message (+ end of turn if it stopped)."""
    marker = _SENTINEL.format(index)
    with_marker = _render(tokenizer, messages, tools)
    real = _render(tokenizer, [*messages[:index], _as_message(choice), *messages[index + 1 :]], tools)
    head, _, tail = with_marker.partition(marker)
    if not (real.startswith(head) and real.endswith(tail) and len(real) >= len(head) + len(tail)):
        raise ValueError(f"the chat template renders message {index} in a way its text cannot be isolated")
    ids: list[int] = tokenizer.encode(real[len(head) : len(real) - len(tail)], add_special_tokens=False)
    if choice.finish_reason in ("stop", "tool_calls") and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def tokenize_history(
    messages_and_choices: Sequence[Any],
    tools: Sequence[Any] | None,
    tokenizer: Any,
    *,
    allow_training_without_logprobs: bool = False,
    where: str = "history",
    cache: dict[Any, Any] | None = None,
) -> TokenizedHistory | None:
    """Render and tokenize one conversation; None when nothing in it is trainable.

    Trainable: every ``Choice`` with logprobs, and (with ``allow_training_without_logprobs``) every ``Choice``
    without them, tokenized from its message. Plain message dicts are context. Text after the last trained
    token is left out: it cannot change the loss. ``cache`` (a dict kept for one batch) reuses renderings
    and encodings shared by the trajectories of a group.
    """
    items = list(messages_and_choices)
    sampled: dict[int, tuple[list[int], list[float]] | None] = {}
    without_logprobs = 0
    for index, item in enumerate(items):
        if is_choice(item):
            found = choice_token_ids(item, tokenizer, where=f"{where}, message {index}")
            if found is not None or allow_training_without_logprobs:
                sampled[index] = found
            if found is None:
                without_logprobs += 1
    if not sampled:
        return TokenizedHistory((), (), (), without_logprobs) if without_logprobs else None
    items = items[: max(sampled) + 1]
    messages = [
        {"role": "assistant", "content": _SENTINEL.format(index)} if index in sampled else _as_message(item)
        for index, item in enumerate(items)
    ]
    text = _render(tokenizer, messages, tools, cache)
    special_text = {
        token_id: tokenizer.convert_ids_to_tokens(token_id) for token_id in tokenizer.all_special_ids
    }
    tokens: list[int] = []
    trained: list[bool] = []
    logprobs: list[float] = []
    cursor, pending_special = 0, ""
    for index in sorted(sampled):
        marker = _SENTINEL.format(index)
        at = text.find(marker, cursor)
        if at < 0:
            raise ValueError(
                f"{where}: the chat template dropped assistant message {index}; it cannot be trained"
            )
        segment = text[cursor:at]
        if pending_special and segment.startswith(pending_special):
            segment = segment[len(pending_special) :]  # the sampled end-of-turn token is already in place
        context = _encode(tokenizer, segment, cache)
        found = sampled[index]
        ids, values = (
            found
            if found is not None
            else (_content_token_ids(tokenizer, messages, tools, index, items[index]), [])
        )
        tokens += [*context, *ids]
        trained += [False] * len(context) + [True] * len(ids)
        logprobs += [math.nan] * len(context) + (values or [math.nan] * len(ids))
        pending_special = special_text.get(ids[-1], "") if ids else ""
        cursor = at + len(marker)
    return TokenizedHistory(tuple(tokens), tuple(trained), tuple(logprobs), without_logprobs)

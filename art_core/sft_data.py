"""OpenAI fine-tuning JSONL → ``Trajectory`` objects for ``train_sft()``, one line at a time.

Each line is ``{"messages": [...], "tools": [...]}`` (``tools`` optional; ``parallel_tool_calls`` accepted and
ignored), as OpenAI's chat fine-tuning takes it; an assistant message may carry ``"weight": 0`` to be context
only. A bad record raises ``SFTDataError`` naming the file, the line number and what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from art_core.trajectories import Trajectory

_ROLES = ("system", "developer", "user", "assistant", "tool")
_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})


class SFTDataError(ValueError):
    """A record of an SFT JSONL file is not a chat fine-tuning example; ``line`` is 1-based."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        self.path, self.line, self.problem = path, line, problem
        super().__init__(f"{path}:{line}: {problem}")


def read_sft_jsonl(path: str | Path) -> Iterator[Trajectory]:
    """Yield one ``Trajectory`` per non-blank line of the OpenAI fine-tuning JSONL file at ``path`` (streaming)."""
    name = str(path)
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield parse_sft_record(line, where=(name, number))


def parse_sft_record(line: str, *, where: tuple[str, int] = ("<record>", 1)) -> Trajectory:
    """One JSONL line as a ``Trajectory``; raises ``SFTDataError`` at ``where`` (path, line) when it is bad."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise SFTDataError(*where, f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise SFTDataError(
            *where, f"a record is a JSON object with 'messages', not a {type(record).__name__}"
        )
    unknown = sorted(set(record) - _KEYS)
    if unknown:
        raise SFTDataError(*where, f"unknown keys {unknown}; a record has 'messages' and optionally 'tools'")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(*where, "'messages' must be a non-empty list of chat messages")
    for index, message in enumerate(messages):
        _check_message(message, index, where)
    if not any(m["role"] == "assistant" and m.get("weight", 1) != 0 for m in messages):
        raise SFTDataError(*where, "no assistant message to train on (add one, or drop the record)")
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise SFTDataError(
            *where, "'tools' must be a list of OpenAI tool objects ({'type': 'function', ...})"
        )
    return Trajectory(messages_and_choices=messages, tools=tools)


def _check_message(message: Any, index: int, where: tuple[str, int]) -> None:
    if not isinstance(message, dict):
        raise SFTDataError(*where, f"message {index} is a {type(message).__name__}, not a JSON object")
    role = message.get("role")
    if role not in _ROLES:
        raise SFTDataError(*where, f"message {index} has role {role!r}; use one of {', '.join(_ROLES)}")
    content = message.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise SFTDataError(*where, f"message {index}: 'content' must be a string or a list of content parts")
    if role == "assistant" and content is None and not message.get("tool_calls"):
        raise SFTDataError(*where, f"assistant message {index} has neither 'content' nor 'tool_calls'")
    weight = message.get("weight", 1)
    if "weight" in message and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
        raise SFTDataError(
            *where, f"message {index} has weight {weight!r}; only assistant messages take 'weight', 0 or 1"
        )


__all__ = ["SFTDataError", "parse_sft_record", "read_sft_jsonl"]

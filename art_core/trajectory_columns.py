"""Trajectory groups as one Arrow table in ART's 10-column layout, built a column at a time.

Each column is one list comprehension handed to ``pa.array`` (no per-row dicts, no per-message function call
for plain message dicts); values repeated per group are encoded once per group and gathered with ``take``. This
is what makes ``Model.log`` several times faster than ART's row-dict writer on both plain messages and Choices.
"""

from __future__ import annotations

import functools
import itertools
import json
import json.encoder
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from art_core.trajectories import Trajectory, TrajectoryGroup, is_choice

if TYPE_CHECKING:
    import pyarrow as pa

SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"art.trajectories.schema_version"


def trajectory_schema() -> pa.Schema:
    """ART's schema, with the schema version in its metadata."""
    import pyarrow as pa

    message_type = pa.struct(
        [
            ("role", pa.string()),
            ("content", pa.string()),
            ("tool_calls", pa.string()),
            ("tool_call_id", pa.string()),
            ("trainable", pa.bool_()),
        ]
    )
    return pa.schema(
        [
            ("group_index", pa.int64()),
            ("group_metadata", pa.string()),
            ("group_metrics", pa.string()),
            ("group_logs", pa.list_(pa.string())),
            ("reward", pa.float64()),
            ("metrics", pa.string()),
            ("metadata", pa.string()),
            ("tools", pa.string()),
            ("logs", pa.list_(pa.string())),
            ("messages", pa.list_(message_type)),
        ],
        metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
    )


def _json_default(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _make_encoder() -> Callable[[Any], str]:
    """``json.dumps(value, default=_json_default)``, with one encoder reused for every value.

    ``json.dumps`` builds a new encoder per call, which is most of the cost of a small dict (3 µs of 4); the
    C encoder it builds is reused here. It skips the circular-reference check, so a value that contains itself
    is a RecursionError instead of a ValueError. Where the C encoder is missing or differs, ``JSONEncoder``.
    """
    fallback = json.JSONEncoder(default=_json_default).encode
    make: Any = getattr(json.encoder, "c_make_encoder", None)  # None where the C accelerator is missing
    try:
        chunks = make(  # the arguments JSONEncoder.iterencode passes it
            None, _json_default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
        )
    except TypeError:  # pragma: no cover - no accelerator, or another signature
        return fallback

    def encode(value: Any) -> str:
        return "".join(chunks(value, 0))

    sample = {"k": [1.5, "é\n", None, True, {"n": 2}], "s": "x"}
    return encode if encode(sample) == fallback(sample) and encode("é") == fallback("é") else fallback


encode_json = _make_encoder()


def json_texts(values: Sequence[Any]) -> list[str | None]:
    """Each value as JSON text, or None where it is empty (ART stores ``{}`` and ``[]`` as null)."""
    return [encode_json(value) if value else None for value in values]


def _choice_message(item: Any) -> dict[str, Any]:
    """The message of a Choice as a message dict (tool calls as plain data); anything else is a TypeError."""
    if not is_choice(item):
        raise TypeError(
            f"messages_and_choices holds a {type(item).__name__} ({str(item)[:80]!r}); expected an OpenAI "
            "message dict or an openai Choice"
        )
    message = item.message
    calls = message.tool_calls
    return {
        "role": message.role,
        "content": message.content,
        "tool_calls": [call.model_dump(mode="json") for call in calls] if calls else None,
    }


def _message_children(items: list[Any]) -> list[pa.Array]:
    """role, content, tool_calls, tool_call_id, trainable of each message or Choice: one pass in Python."""
    import pyarrow as pa

    role: list[Any] = []
    content: list[Any] = []
    tool_calls: list[Any] = []
    tool_call_id: list[Any] = []
    trainable: list[bool] = []
    for item in items:
        message = item if isinstance(item, dict) else _choice_message(item)
        role.append(message.get("role"))
        text = message.get("content")
        content.append(text if text is None or isinstance(text, str) else encode_json(text))  # multi-part
        tool_calls.append(message.get("tool_calls"))
        tool_call_id.append(message.get("tool_call_id"))
        trainable.append(message is not item)
    return [
        pa.array(role, pa.string()),
        pa.array(content, pa.string()),
        pa.array(json_texts(tool_calls), pa.string()),
        pa.array(tool_call_id, pa.string()),
        pa.array(trainable, pa.bool_()),
    ]


@functools.cache
def _plain_message_type() -> pa.StructType:
    """The fields Arrow reads from a plain message dict as is (tool calls are JSON-encoded apart)."""
    import pyarrow as pa

    return pa.struct([("role", pa.string()), ("content", pa.string()), ("tool_call_id", pa.string())])


def _plain_message_children(items: list[Any]) -> list[pa.Array] | None:
    """The same for message dicts with string content only, read by Arrow in C; None where that does not apply.

    Plain chat logs (evals, untrained rollouts) are all such dicts, and this is 2× faster than the loop.
    """
    import pyarrow as pa

    if not set(map(type, items)) <= {dict}:
        return None
    try:
        struct = pa.array(items, _plain_message_type())
    except (pa.ArrowTypeError, pa.ArrowInvalid):  # e.g. multi-part content, which is stored as its JSON
        return None
    calls = [item.get("tool_calls") for item in items]
    return [
        struct.field(0),
        struct.field(1),
        pa.array(json_texts(calls), pa.string()) if any(calls) else pa.nulls(len(items), pa.string()),
        struct.field(2),
        pa.repeat(False, len(items)),
    ]


def message_column(trajectories: Sequence[Trajectory], field: pa.Field) -> pa.Array:
    """The ``messages`` list<struct> column: one list per trajectory, Choices marked ``trainable``."""
    import pyarrow as pa

    lists = [trajectory.messages_and_choices for trajectory in trajectories]
    items = list(itertools.chain.from_iterable(lists))
    children = _plain_message_children(items) or _message_children(items)
    struct = pa.StructArray.from_arrays(children, fields=list(field.type.value_type))
    offsets = pa.array([0, *itertools.accumulate(map(len, lists))], pa.int32())
    return pa.ListArray.from_arrays(offsets, struct, type=field.type)


def groups_to_table(groups: Sequence[TrajectoryGroup]) -> pa.Table:
    """One row per trajectory (exceptions are not rows), in ART's column order."""
    import pyarrow as pa

    schema = trajectory_schema()
    trajectories = [trajectory for group in groups for trajectory in group.trajectories]
    group_index = pa.array(
        [index for index, group in enumerate(groups) for _ in group.trajectories], pa.int64()
    )

    def per_group(values: list[Any], type_: pa.DataType) -> pa.Array:
        return pa.array(values, type_).take(group_index)

    columns = [
        group_index,
        per_group(json_texts([group.metadata for group in groups]), pa.string()),
        per_group(json_texts([group.metrics for group in groups]), pa.string()),
        per_group([group.logs or None for group in groups], pa.list_(pa.string())),
        pa.array([trajectory.reward for trajectory in trajectories], pa.float64()),
        pa.array(json_texts([trajectory.metrics for trajectory in trajectories]), pa.string()),
        pa.array(json_texts([trajectory.metadata for trajectory in trajectories]), pa.string()),
        pa.array(json_texts([trajectory.tools for trajectory in trajectories]), pa.string()),
        pa.array([trajectory.logs or None for trajectory in trajectories], pa.list_(pa.string())),
        message_column(trajectories, schema.field("messages")),
    ]
    return pa.Table.from_arrays(columns, schema=schema)

"""Trajectory groups ↔ ART's parquet layout (10 columns, zstd), written atomically.

Columns are built directly as Arrow arrays rather than through row dicts, which is most of why our
``Model.log`` is faster than ART's.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from art_core.trajectories import Trajectory, TrajectoryGroup, is_choice

if TYPE_CHECKING:
    import pyarrow as pa

SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"art.trajectories.schema_version"
MESSAGE_FIELDS = ("role", "content", "tool_calls", "tool_call_id", "trainable")


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


def _json_or_none(value: Any) -> str | None:
    return json.dumps(value, default=_json_default) if value else None


def _json_default(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _content_text(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    return json.dumps(content, default=_json_default)  # multi-part content


class _MessageColumns:
    """Flat child arrays of the ``messages`` list<struct> column, filled one message at a time."""

    def __init__(self) -> None:
        self.role: list[str | None] = []
        self.content: list[str | None] = []
        self.tool_calls: list[str | None] = []
        self.tool_call_id: list[str | None] = []
        self.trainable: list[bool] = []

    def add(self, item: Any) -> None:
        if is_choice(item):
            message = item.message
            self.role.append(message.role)
            self.content.append(message.content)
            calls = message.tool_calls
            self.tool_calls.append(
                json.dumps([call.model_dump(mode="json") for call in calls]) if calls else None
            )
            self.tool_call_id.append(None)
            self.trainable.append(True)
            return
        self.role.append(item.get("role"))
        self.content.append(_content_text(item.get("content")))
        self.tool_calls.append(_json_or_none(item.get("tool_calls")))
        self.tool_call_id.append(item.get("tool_call_id"))
        self.trainable.append(False)

    def __len__(self) -> int:
        return len(self.role)


def groups_to_table(groups: Sequence[TrajectoryGroup]) -> pa.Table:
    """One row per trajectory (exceptions are not rows), in ART's column order."""
    import pyarrow as pa

    schema = trajectory_schema()
    group_index: list[int] = []
    group_metadata: list[str | None] = []
    group_metrics: list[str | None] = []
    group_logs: list[list[str] | None] = []
    reward: list[float] = []
    metrics: list[str | None] = []
    metadata: list[str | None] = []
    tools: list[str | None] = []
    logs: list[list[str] | None] = []
    offsets = [0]
    messages = _MessageColumns()
    for index, group in enumerate(groups):
        g_metadata = _json_or_none(group.metadata)
        g_metrics = _json_or_none(group.metrics)
        g_logs = group.logs or None
        trajectory: Trajectory
        for trajectory in group.trajectories:
            group_index.append(index)
            group_metadata.append(g_metadata)
            group_metrics.append(g_metrics)
            group_logs.append(g_logs)
            reward.append(trajectory.reward)
            metrics.append(_json_or_none(trajectory.metrics))
            metadata.append(_json_or_none(trajectory.metadata))
            tools.append(_json_or_none(trajectory.tools))
            logs.append(trajectory.logs or None)
            for item in trajectory.messages_and_choices:
                messages.add(item)
            offsets.append(len(messages))
    message_struct = pa.StructArray.from_arrays(
        [
            pa.array(messages.role, pa.string()),
            pa.array(messages.content, pa.string()),
            pa.array(messages.tool_calls, pa.string()),
            pa.array(messages.tool_call_id, pa.string()),
            pa.array(messages.trainable, pa.bool_()),
        ],
        fields=list(schema.field("messages").type.value_type),
    )
    columns = [
        pa.array(group_index, pa.int64()),
        pa.array(group_metadata, pa.string()),
        pa.array(group_metrics, pa.string()),
        pa.array(group_logs, pa.list_(pa.string())),
        pa.array(reward, pa.float64()),
        pa.array(metrics, pa.string()),
        pa.array(metadata, pa.string()),
        pa.array(tools, pa.string()),
        pa.array(logs, pa.list_(pa.string())),
        pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), message_struct),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write to a temp file beside ``path``, fsync, then rename: readers never see half a file."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_trajectory_groups(groups: Sequence[TrajectoryGroup], path: str | Path) -> None:
    """Write groups to ``path`` in ART's parquet layout (a 0-row file still carries the schema)."""
    write_parquet_atomic(groups_to_table(groups), Path(path))


def read_trajectory_groups(path: str | Path) -> list[TrajectoryGroup]:
    """Read a trajectories parquet file back into groups (messages come back as plain dicts, as in ART)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = table.to_pylist()
    by_group: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(int(row["group_index"]), []).append(row)
    groups = []
    for index in sorted(by_group):
        first = by_group[index][0]
        trajectories = [
            Trajectory(
                messages_and_choices=cast(Any, [_unflatten(message) for message in row["messages"] or []]),
                tools=json.loads(row["tools"]) if row["tools"] else None,
                reward=row["reward"],
                metrics=json.loads(row["metrics"]) if row["metrics"] else {},
                metadata=json.loads(row["metadata"]) if row["metadata"] else {},
                logs=row["logs"] or [],
            )
            for row in by_group[index]
        ]
        groups.append(
            TrajectoryGroup(
                trajectories,
                metadata=json.loads(first["group_metadata"]) if first["group_metadata"] else None,
                metrics=json.loads(first["group_metrics"]) if first["group_metrics"] else None,
                logs=first["group_logs"] or None,
            )
        )
    return groups


def _unflatten(message: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        result["tool_calls"] = json.loads(message["tool_calls"])
    if message.get("tool_call_id"):
        result["tool_call_id"] = message["tool_call_id"]
    return result

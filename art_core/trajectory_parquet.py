"""Trajectory groups ↔ ART's parquet layout (10 columns, zstd), written atomically.

Columns are built directly as Arrow arrays rather than through row dicts (``art_core.trajectory_columns``),
which is most of why our ``Model.log`` is faster than ART's.

``Model.log`` *appends*: logging a split and step that already has a file rewrites it, atomically, as the old
rows followed by the new ones (group indices continue), so validation logged in chunks, or train and val logged
by separate calls, never loses rows, and every reader still finds one ``{step:04d}.parquet`` per step as in ART.
Writers of a directory hold an advisory lock on it; under that lock, temp files left by a killed writer are
removed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from art_core.durable import atomic_write_with
from art_core.trajectories import Trajectory, TrajectoryGroup
from art_core.trajectory_columns import SCHEMA_VERSION as SCHEMA_VERSION
from art_core.trajectory_columns import SCHEMA_VERSION_KEY as SCHEMA_VERSION_KEY
from art_core.trajectory_columns import groups_to_table as groups_to_table
from art_core.trajectory_columns import trajectory_schema as trajectory_schema

if TYPE_CHECKING:
    import pyarrow as pa

try:  # POSIX advisory locks serialise writers of one directory across threads and processes
    import fcntl
except ImportError:  # pragma: no cover - Windows: writers of one directory are not serialised
    fcntl = None  # type: ignore[assignment]


# zstd as in ART. No dictionary pages: nearly every message is distinct, so Arrow would build a dictionary only
# to drop it, and zstd finds repeated prompts anyway (smaller files, ~20% less time). Min/max statistics only
# where a reader filters on them; those of message text cost time and skip nothing.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": False,
    "write_statistics": ["group_index", "reward"],
}


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` durably: readers never see half a file (art_core.durable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Encoded in memory, then written with one call: a Python file handed to pyarrow takes one GIL round trip
    # and one small write per page, which costs more than the encoding itself.
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, **PARQUET_OPTIONS)
    atomic_write_with(path, lambda handle: handle.write(memoryview(buffer.getvalue())))


def write_trajectory_groups(groups: Sequence[TrajectoryGroup], path: str | Path) -> None:
    """Write groups to ``path`` in ART's parquet layout (a 0-row file still carries the schema)."""
    write_parquet_atomic(groups_to_table(groups), Path(path))


# What ``write_parquet_atomic`` names its temp files: ``.{name}.{random}.tmp``.
TEMP_FILE_GLOB = ".*.parquet.*.tmp"


@contextlib.contextmanager
def locked_directory(directory: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``directory``; yields False when ``blocking=False`` and it is taken."""
    if fcntl is None:  # pragma: no cover - Windows
        yield True
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files of writers that died mid-write; call it holding ``locked_directory(directory)``."""
    removed = []
    for path in sorted(directory.glob(TEMP_FILE_GLOB)):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def clean_trajectory_dirs(trajectories_dir: Path) -> list[Path]:
    """Remove stale temp files from every split directory whose lock is free (a busy one cleans itself)."""
    removed: list[Path] = []
    if not trajectories_dir.is_dir():
        return removed
    for directory in sorted(p for p in trajectories_dir.iterdir() if p.is_dir()):
        with locked_directory(directory, blocking=False) as locked:
            if locked:
                removed.extend(remove_stale_temp_files(directory))
    return removed


def _existing_table(path: Path) -> pa.Table:
    """The rows already at ``path``, in our schema; ValueError (nothing written) when they cannot be."""
    import pyarrow.parquet as pq

    schema = trajectory_schema()
    try:
        table = pq.read_table(path)
        return table.select(schema.names).cast(schema)
    except Exception as error:  # any unreadable or foreign file gets the same advice
        raise ValueError(
            f"cannot append to {path}: it is not a trajectories file this version can extend "
            f"({type(error).__name__}: {error}); move it away, or log under another step or split"
        ) from error


def append_trajectory_groups(groups: Sequence[TrajectoryGroup], path: str | Path) -> None:
    """Add ``groups`` to the parquet file at ``path`` (created if absent), atomically, under the directory lock.

    Group indices of the new rows continue after the existing ones, so groups of separate calls stay apart.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked_directory(target.parent):
        remove_stale_temp_files(target.parent)
        new = groups_to_table(groups)
        if not target.exists():
            write_parquet_atomic(new, target)
            return
        old = _existing_table(target)
        if new.num_rows == 0:
            return  # nothing to add: the file already carries the schema
        offset = pc.max(old["group_index"]).as_py() + 1 if old.num_rows else 0
        shifted = new.set_column(0, "group_index", pc.add(new["group_index"], pa.scalar(offset, pa.int64())))
        write_parquet_atomic(pa.concat_tables([old, shifted]), target)


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

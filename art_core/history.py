"""``history.jsonl``: one JSON object per ``Model.log`` call; metric naming, computed metrics, safe appends."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from art_core.advantages import is_trainable_group, mean_reward_std_dev
from art_core.trajectories import TrajectoryGroup

# Keys whose first path component is one of these are logged as given; others get the split as prefix (ART).
METRIC_SECTIONS = frozenset(
    {"reward", "loss", "offpolicy", "pipeline", "throughput", "costs", "time", "data"}
)
METRIC_SPLITS = frozenset({"train", "val", "test"})

try:  # POSIX advisory locks make concurrent appends from several processes safe
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def prefixed_metrics(metrics: Mapping[str, float], split: str) -> dict[str, float]:
    """Prefix keys with ``{split}/`` unless they already sit under a section (``loss/``, ``data/``, …)."""
    if split not in METRIC_SPLITS:
        return {f"{split}/{key}": value for key, value in metrics.items()}
    result: dict[str, float] = {}
    for key, value in metrics.items():
        head, slash, _ = key.partition("/")
        keep = slash and (head in METRIC_SECTIONS or head in METRIC_SPLITS)
        result[key if keep else f"{split}/{key}"] = value
    return result


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def computed_metrics(groups: Sequence[TrajectoryGroup], split: str) -> dict[str, float]:
    """Reward mean, within-group reward std dev, exception rate, per-metric means and group counts (ART keys)."""
    rewards = [trajectory.reward for group in groups for trajectory in group.trajectories]
    num_trajectories = len(rewards)
    num_exceptions = sum(len(group.exceptions) for group in groups)
    metrics: dict[str, float] = {}
    if rewards:
        metrics["reward"] = _mean(rewards)
    if num_trajectories + num_exceptions:
        metrics["exception_rate"] = num_exceptions / (num_trajectories + num_exceptions)
    metrics["reward_std_dev"] = mean_reward_std_dev(groups)
    per_metric: dict[str, list[float]] = {}
    for group in groups:
        for trajectory in group.trajectories:
            for key, value in trajectory.metrics.items():
                per_metric.setdefault(key, []).append(float(value))
    for key, values in per_metric.items():
        metrics.setdefault(key, _mean(values))
    per_group_metric: dict[str, list[float]] = {}
    for group in groups:
        if group.trajectories:
            for key, value in group.metrics.items():
                per_group_metric.setdefault(key, []).append(float(value))
    for key, values in per_group_metric.items():
        metrics[f"group_{key}"] = _mean(values)
    metrics["data/step_num_scenarios"] = float(len(groups))
    metrics["data/step_num_trajectories"] = float(num_trajectories + num_exceptions)
    metrics["data/step_num_groups_submitted"] = float(len(groups))
    if split == "train":
        trainable = sum(is_trainable_group([t.reward for t in group.trajectories]) for group in groups)
        metrics["data/step_num_groups_trainable"] = float(trainable)
    return metrics


def make_record(step: int, metrics: Mapping[str, float]) -> dict[str, Any]:
    """The history line: ``step``, ``recorded_at`` and every finite metric (NaN/Infinity never reach the file)."""
    record: dict[str, Any] = {key: value for key, value in metrics.items() if math.isfinite(value)}
    dropped = sorted(set(metrics) - set(record))
    if dropped:
        warnings.warn(f"not logging non-finite values of {', '.join(dropped)}", RuntimeWarning, stacklevel=3)
    record["step"] = step
    record["recorded_at"] = datetime.now().isoformat()
    return record


def open_for_append(path: Path) -> int:
    """Open (creating if needed) a history file for appending; fails early if it cannot be written."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if not os.path.isfile(path):  # pragma: no cover - O_WRONLY on a directory already fails
        os.close(fd)
        raise IsADirectoryError(f"{path} is not a regular file")
    return fd


def append_line(fd: int, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single locked ``write`` and fsync, so concurrent writers never interleave."""
    line = (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode()
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        written = 0
        while written < len(line):  # a regular-file write is whole in practice; loop for the exception
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record to the history file at ``path``."""
    fd = open_for_append(path)
    try:
        append_line(fd, record)
    finally:
        os.close(fd)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a history file, with every key whatever line it first appears on.

    A corrupt line (e.g. cut by a crash of another writer) is skipped with a warning. A missing file is
    ``FileNotFoundError``.
    """
    records: list[dict[str, Any]] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                warnings.warn(f"{path}:{number} is not valid JSON; skipping it", RuntimeWarning, stacklevel=2)
                continue
            if not isinstance(record, dict):
                warnings.warn(
                    f"{path}:{number} is not a JSON object; skipping it", RuntimeWarning, stacklevel=2
                )
                continue
            records.append(record)
    return records


def metric_by_step(records: Iterable[Mapping[str, Any]], metric: str) -> dict[int, float]:
    """Mean of ``metric`` per step over the records that carry it (several lines may share a step)."""
    values: dict[int, list[float]] = {}
    for record in records:
        value = record.get(metric)
        step = record.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(step, int):
            values.setdefault(step, []).append(float(value))
    return {step: _mean(step_values) for step, step_values in values.items()}


def best_step(
    records: Iterable[Mapping[str, Any]], metric: str, *, higher_is_better: bool = True
) -> int | None:
    """The step whose mean ``metric`` is best (latest step wins ties), or None when no record has it."""
    by_step = metric_by_step(records, metric)
    if not by_step:
        return None
    sign = 1.0 if higher_is_better else -1.0
    return max(by_step, key=lambda step: (sign * by_step[step], step))

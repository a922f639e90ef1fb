"""Checkpoints: one JSON file per step under the model's directory, written atomically and durably."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from art_core.plugin_api import atomic_write_text

from art_bigram.policy import Table

_NAME = re.compile(r"^(\d{4,})\.json$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"{step:04d}.json"


def saved_steps(directory: Path) -> list[int]:
    """The steps with a complete checkpoint (a crash mid-write leaves only a temp file, never a step)."""
    if not directory.is_dir():
        return []
    return sorted(int(match[1]) for name in os.listdir(directory) if (match := _NAME.match(name)))


def save(directory: Path, step: int, table: Table) -> Path:
    """Write ``table`` as step ``step``; readers see the old state or the new one, nothing in between."""
    return atomic_write_text(checkpoint_path(directory, step), json.dumps({"step": step, "logits": table}))


def load(directory: Path, step: int) -> Table:
    """The table of ``step``; ``LookupError`` naming the kept steps when there is none."""
    try:
        data = json.loads(checkpoint_path(directory, step).read_text())
    except FileNotFoundError:
        raise LookupError(f"no checkpoint for step {step}; kept steps: {saved_steps(directory)}") from None
    table: Table = data["logits"]
    return table


def keep_only(directory: Path, steps_to_keep: list[int]) -> None:
    """Delete every checkpoint whose step is not in ``steps_to_keep``."""
    keep = set(steps_to_keep)
    for step in saved_steps(directory):
        if step not in keep:
            checkpoint_path(directory, step).unlink(missing_ok=True)

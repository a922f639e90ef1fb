"""An on-disk cache of judge answers, keyed by the whole request, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from art_core.durable import atomic_write_text


def request_key(request: dict[str, Any]) -> str:
    """A stable hash of a chat-completions request (model, messages, format and every option)."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class JudgeCache:
    """Answers stored as ``{directory}/{key[:2]}/{key}.json``; a missing or unreadable entry is a miss."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            entry = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        content = entry.get("content") if isinstance(entry, dict) else None
        return content if isinstance(content, str) else None

    def put(self, key: str, content: str) -> None:
        """Write the entry durably: readers never see half of one (art_core.durable)."""
        atomic_write_text(self._path(key), json.dumps({"key": key, "content": content}))

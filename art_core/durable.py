"""Durable writes: a file or directory appears whole or not at all, and is on disk once the call returns.

Each helper writes a temporary sibling, fsyncs it (every file of a directory), renames it into place and fsyncs
the parent directory so that the rename itself survives a power cut. Temporary names start with a dot, so
readers that list a directory skip them: files are ``.{name}.{random}.tmp`` (``TEMP_FILE_GLOB``), directories
``.tmp-{name}-{random}`` and, while being replaced, ``.old-{name}-{random}`` (``STALE_DIR_PREFIXES``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_FILE_GLOB = ".*.tmp"
STALE_DIR_PREFIXES = (".tmp-", ".old-")


def fsync_dir(directory: str | Path) -> None:
    """fsync ``directory`` itself, so renames into it are durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is then as durable as it gets
        pass
    finally:
        os.close(descriptor)


def fsync_tree(directory: str | Path) -> None:
    """fsync every file under ``directory``, then every directory bottom-up."""
    root = Path(directory)
    paths = sorted(root.rglob("*"), key=lambda path: len(path.parts), reverse=True)
    for path in paths:
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], object], *, mode: int = 0o644) -> Path:
    """Call ``write(handle)`` on a temp file beside ``path``, fsync it, rename it to ``path``; returns ``path``.

    Readers see the old file or the new one, never half of one. The parent directory is created if missing.
    ``mode`` is the file's permission bits (0o600 for a secret), set before anything is written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically and durably; returns ``path``."""
    return atomic_write_with(path, lambda handle: handle.write(data), mode=mode)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8", mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` atomically and durably; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding), mode=mode)


def atomic_replace_dir(
    directory: str | Path, write: Callable[[Path], None], *, keep_existing: bool = False
) -> Path:
    """Run ``write(staging)`` in a temp sibling of ``directory``, fsync it all, then rename it to ``directory``.

    An existing ``directory`` is replaced (renamed aside first, deleted after), so readers see the old tree or
    the new one. With ``keep_existing=True`` a ``directory`` that already exists wins instead: for a cache that
    several processes may fill at once, where the first complete copy is as good as any. Returns ``directory``.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STALE_DIR_PREFIXES[0]}{target.name}-", dir=target.parent))
    replaced: Path | None = None
    try:
        write(staging)
        fsync_tree(staging)
        if target.exists() and not keep_existing:
            replaced = target.parent / f"{STALE_DIR_PREFIXES[1]}{target.name}-{uuid.uuid4().hex}"
            os.rename(target, replaced)
        try:
            os.rename(staging, target)
        except OSError:
            if replaced is not None:  # put the old tree back rather than leave nothing in place
                os.rename(replaced, target)
                replaced = None
            if not (keep_existing and target.is_dir()):
                raise
        fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return target


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete what interrupted writes left directly in ``directory`` (temp files and dirs); returns them."""
    root = Path(directory)
    if not root.is_dir():
        return []
    stale = [
        path
        for path in root.iterdir()
        if path.name.startswith(STALE_DIR_PREFIXES) or (path.is_file() and path.match(TEMP_FILE_GLOB))
    ]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return stale


__all__ = [
    "STALE_DIR_PREFIXES",
    "TEMP_FILE_GLOB",
    "atomic_replace_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_with",
    "fsync_dir",
    "fsync_tree",
    "remove_stale_temporaries",
]

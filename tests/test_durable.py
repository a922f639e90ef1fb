"""art_core.durable: whole-or-nothing writes, fsynced (file, tree and parent directory) before the call returns."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from art_core import durable


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every descriptor fsynced (resolved through /proc or /dev/fd where available)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", spy)
    return seen


def test_atomic_write_text_fsyncs_the_file_and_its_directory(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "sub" / "record.json"
    durable.atomic_write_text(target, "one")
    durable.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert str(tmp_path / "sub") in fsynced  # the rename is durable, not only the bytes
    assert any(Path(p).name.startswith(".record.json.") for p in fsynced)  # the temp file, before its rename
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    durable.atomic_write_bytes(target, b"old", mode=0o600)

    def half(handle: object) -> None:
        handle.write(b"ne")  # type: ignore[attr-defined]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        durable.atomic_write_with(target, half)
    assert target.read_bytes() == b"old" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_replace_dir_replaces_whole_and_fsyncs_every_file(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "0003"

    def write(version: str) -> None:
        def fill(staging: Path) -> None:
            assert staging.parent == tmp_path and staging.name.startswith(".tmp-0003-")
            (staging / "nested").mkdir()
            (staging / "nested" / "weights").write_text(version)
            (staging / "meta.json").write_text(version)

        durable.atomic_replace_dir(target, fill)

    write("a")
    write("b")
    assert (target / "meta.json").read_text() == "b" and (target / "nested" / "weights").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0003"]  # the old tree and the staging are gone
    assert str(tmp_path) in fsynced
    assert sum(Path(p).name == "weights" for p in fsynced) == 2  # nested files too, on each write

    def broken(staging: Path) -> None:
        (staging / "meta.json").write_text("c")
        raise OSError("killed")

    with pytest.raises(OSError, match="killed"):
        durable.atomic_replace_dir(target, broken)
    assert (target / "meta.json").read_text() == "b" and sorted(p.name for p in tmp_path.iterdir()) == [
        "0003"
    ]


def test_keep_existing_lets_the_first_complete_copy_win(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    durable.atomic_replace_dir(target, lambda staging: (staging / "v").write_text("first"))
    durable.atomic_replace_dir(
        target, lambda staging: (staging / "v").write_text("second"), keep_existing=True
    )
    assert (target / "v").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_remove_stale_temporaries_removes_only_leftovers(tmp_path: Path) -> None:
    for name in (".tmp-0001-x", ".old-0002-y"):
        (tmp_path / name).mkdir()
    (tmp_path / ".record.json.abc.tmp").write_text("")
    (tmp_path / "0001").mkdir()
    (tmp_path / "record.json").write_text("")
    removed = durable.remove_stale_temporaries(tmp_path)
    assert len(removed) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["0001", "record.json"]

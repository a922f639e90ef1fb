"""Where the loopback server keeps checkpoints: ``{root}/runs/{model_id}/{weights|sampler_weights}/{name}/``.

The directory tree is the source of truth for listing, loading and deleting, so checkpoints survive a server
restart. Every checkpoint is written into a temporary directory and renamed into place with a ``tinker.json``
describing it (base model, LoRA config, time, user metadata); a half-written checkpoint is never listed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from art_core.plugin_api import atomic_write_text, fsync_dir, fsync_tree
from art_tinker.server.errors import NotFound, UserError

Kind = Literal["weights", "sampler_weights"]
KINDS: tuple[Kind, ...] = ("weights", "sampler_weights")
CHECKPOINT_TYPE = {"weights": "training", "sampler_weights": "sampler"}
META_FILE = "tinker.json"

MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}:train:[0-9]{1,9}$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter's shape: fixed when a training model is created."""

    rank: int
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class RunInfo:
    """What a training run was created from (``run.json``)."""

    model_id: str
    base_model: str
    lora: LoraSpec
    created: str


@dataclass(frozen=True)
class CheckpointRef:
    """A parsed ``tinker://{model_id}/{kind}/{name}`` path."""

    model_id: str
    kind: Kind
    name: str

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.model_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


def check_model_id(model_id: str) -> str:
    """Refuse anything that is not ``{session_id}:train:{n}`` (it becomes a directory name)."""
    if not MODEL_ID_PATTERN.match(model_id):
        raise NotFound(
            f"model_id {model_id[:100]!r} is unknown; model ids look like '<session_id>:train:<n>'"
        )
    return model_id


def check_name(name: str) -> str:
    """A checkpoint name is one path segment of letters, digits, '_', '-' and '.'."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise UserError(
            f"checkpoint name {name[:100]!r} is not allowed; use letters, digits, '_', '-' and '.' "
            "(one path segment, e.g. 'step-000003')"
        )
    return name


def parse_tinker_path(path: str) -> CheckpointRef:
    """``tinker://{model_id}/{weights|sampler_weights}/{name}`` -> ``CheckpointRef`` (UserError otherwise)."""
    if not path.startswith("tinker://"):
        raise UserError(
            f"path {path[:200]!r} is not a tinker:// path; expected tinker://<model_id>/weights/<name>"
        )
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or parts[1] not in KINDS:
        raise UserError(
            f"path {path[:200]!r} must look like tinker://<model_id>/weights/<name> or .../sampler_weights/<name>"
        )
    kind: Kind = "weights" if parts[1] == "weights" else "sampler_weights"
    return CheckpointRef(check_model_id(parts[0]), kind, check_name(parts[2]))


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True))


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class CheckpointStore:
    """Checkpoints and run records under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "runs").mkdir(parents=True, exist_ok=True)
        (self.root / "ephemeral").mkdir(parents=True, exist_ok=True)

    def run_dir(self, model_id: str) -> Path:
        return self.root / "runs" / check_model_id(model_id)

    def write_run(self, info: RunInfo) -> None:
        """Record what a training run was created from (before its first checkpoint)."""
        directory = self.run_dir(info.model_id)
        directory.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(directory / "run.json", asdict(info))

    def read_run(self, model_id: str) -> RunInfo:
        """The run record, or NotFound naming the id."""
        path = self.run_dir(model_id) / "run.json"
        if not path.exists():
            raise NotFound(f"training run {model_id!r} does not exist on this server")
        raw = json.loads(path.read_text(encoding="utf-8"))
        return RunInfo(raw["model_id"], raw["base_model"], LoraSpec(**raw["lora"]), raw["created"])

    def checkpoint_dir(self, ref: CheckpointRef) -> Path:
        return self.run_dir(ref.model_id) / ref.kind / ref.name

    def existing(self, ref: CheckpointRef) -> Path:
        """The checkpoint's directory, or NotFound naming its tinker path."""
        directory = self.checkpoint_dir(ref)
        if not (directory / META_FILE).exists():
            raise NotFound(
                f"checkpoint {ref.tinker_path} does not exist; list them with RestClient.list_checkpoints"
            )
        return directory

    def read_meta(self, ref: CheckpointRef) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.existing(ref) / META_FILE).read_text(encoding="utf-8"))
        return data

    @contextmanager
    def writing(
        self, ref: CheckpointRef, run: RunInfo, *, overwrite: bool, user_metadata: dict[str, str] | None
    ) -> Iterator[Path]:
        """Yield an empty temporary directory to fill; on success it becomes the checkpoint, atomically."""
        final = self.checkpoint_dir(ref)
        if (final / META_FILE).exists() and not overwrite:
            raise UserError(
                f"checkpoint {ref.tinker_path} already exists; pick another name or pass overwrite=True"
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{ref.name}-{uuid.uuid4().hex}"
        try:
            yield tmp
            meta = {
                "tinker_path": ref.tinker_path,
                "time": _now(),
                "base_model": run.base_model,
                "lora": asdict(run.lora),
                "user_metadata": user_metadata,
            }
            tmp.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(tmp / META_FILE, meta)
            fsync_tree(tmp)  # the weights the caller wrote, not only the metadata
            trash = final.parent / f".trash-{ref.name}-{uuid.uuid4().hex}"
            if final.exists():
                os.replace(final, trash)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def list(self, model_id: str) -> list[dict[str, Any]]:
        """Every checkpoint of a run as the SDK's ``Checkpoint`` JSON, oldest first."""
        self.read_run(model_id)
        found = []
        for kind in KINDS:
            base = self.run_dir(model_id) / kind
            if not base.is_dir():
                continue
            for directory in base.iterdir():
                meta_path = directory / META_FILE
                if directory.name.startswith(".") or not meta_path.exists():
                    continue
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                ref = CheckpointRef(model_id, kind, directory.name)
                found.append(
                    {
                        "checkpoint_id": ref.checkpoint_id,
                        "checkpoint_type": CHECKPOINT_TYPE[kind],
                        "time": meta["time"],
                        "tinker_path": ref.tinker_path,
                        "size_bytes": _dir_size(directory),
                        "public": False,
                        "user_metadata": meta.get("user_metadata"),
                        "expires_at": None,
                    }
                )
        return sorted(found, key=lambda c: (c["time"], c["checkpoint_id"]))

    def delete(self, ref: CheckpointRef) -> None:
        """Remove one checkpoint (rename first, so a crash never leaves a listed half-deleted one)."""
        directory = self.existing(ref)
        trash = directory.parent / f".trash-{ref.name}-{uuid.uuid4().hex}"
        os.replace(directory, trash)
        fsync_dir(directory.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def ephemeral_dir(self) -> Path:
        """A fresh directory for unnamed sampler weights (deleted with their session)."""
        path = self.root / "ephemeral" / uuid.uuid4().hex
        return path

"""The model -> Tinker run mapping, persisted as ``{model.output_dir()}/tinker_run.json`` so a fresh backend resumes.

Written durably (art_core.plugin_api.atomic_write_text); a record is a frozen value and every change writes a new one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from art_core.plugin_api import atomic_write_text

RECORD_FILE = "tinker_run.json"
RECORD_VERSION = 1


@dataclass(frozen=True)
class LoraChoice:
    """The LoRA shape fixed on a model's first ``train()``."""

    rank: int
    train_mlp: bool
    train_attn: bool
    train_unembed: bool


@dataclass(frozen=True)
class StepCheckpoint:
    """What was saved after one step: the resumable state and/or the persistent sampler weights."""

    state_path: str | None = None
    sampler_path: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """Everything a fresh ``TinkerBackend`` needs to continue a model."""

    base_model: str
    lora: LoraChoice
    step: int = 0
    model_ids: tuple[str, ...] = ()
    checkpoints: dict[int, StepCheckpoint] = field(default_factory=dict)

    def latest_state(self) -> tuple[int, str] | None:
        """The newest step with a resumable state, and its path."""
        saved = [(step, c.state_path) for step, c in self.checkpoints.items() if c.state_path]
        if not saved:
            return None
        step, path = max(saved)
        assert path is not None
        return step, path

    def with_model_id(self, model_id: str) -> RunRecord:
        return self if model_id in self.model_ids else replace(self, model_ids=(*self.model_ids, model_id))

    def with_step(self, step: int, checkpoint: StepCheckpoint) -> RunRecord:
        checkpoints = dict(self.checkpoints)
        if checkpoint.state_path or checkpoint.sampler_path:
            checkpoints[step] = checkpoint
        return replace(self, step=step, checkpoints=checkpoints)

    def keeping(self, steps: set[int]) -> RunRecord:
        return replace(self, checkpoints={s: c for s, c in self.checkpoints.items() if s in steps})


def read_record(directory: Path) -> RunRecord | None:
    """The record in ``directory``, or None when the model was never trained through Tinker."""
    path = directory / RECORD_FILE
    if not path.exists():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("version") != RECORD_VERSION:
        raise ValueError(
            f"{path} has version {raw.get('version')!r}; this art-tinker reads version {RECORD_VERSION}"
        )
    return RunRecord(
        base_model=raw["base_model"],
        lora=LoraChoice(**raw["lora"]),
        step=int(raw["step"]),
        model_ids=tuple(raw["model_ids"]),
        checkpoints={int(step): StepCheckpoint(**c) for step, c in raw["checkpoints"].items()},
    )


def write_record(directory: Path, record: RunRecord) -> None:
    """Replace the record atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"version": RECORD_VERSION, **asdict(record)}
    payload["checkpoints"] = {str(step): asdict(c) for step, c in sorted(record.checkpoints.items())}
    atomic_write_text(directory / RECORD_FILE, json.dumps(payload, indent=1, sort_keys=True))

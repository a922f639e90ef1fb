"""Checkpoint forking: start a model from a step of another model's checkpoints (ART's
``_experimental_fork_checkpoint``), copied atomically so a crash never leaves a half-copied step."""

from __future__ import annotations

import shutil
from pathlib import Path

from art_local.training.checkpoint import checkpoint_steps, write_atomically


def source_dir(root: Path, project: str, name: str) -> Path:
    """``{root}/{project}/models/{name}/checkpoints``, refusing names that would leave ``root``."""
    for what, value in (("from_project", project), ("from_model", name)):
        if not isinstance(value, str) or not value or Path(value).name != value or value in {".", ".."}:
            raise ValueError(f"{what}={value!r} is not a model or project name (no '/', not '.' or '..')")
    return root / project / "models" / name / "checkpoints"


def pick_step(steps: list[int], not_after_step: int | None, source: Path) -> int:
    """The latest of ``steps`` that is not after ``not_after_step`` (the latest of all when None)."""
    if not steps:
        raise FileNotFoundError(
            f"{source} holds no complete checkpoint to fork; train the source model first, or check "
            "from_model/from_project and the backend's path"
        )
    if not_after_step is None:
        return steps[-1]
    eligible = [step for step in steps if step <= not_after_step]
    if not eligible:
        raise ValueError(
            f"no checkpoint of {source} at or before step {not_after_step}; its steps are {steps}; "
            f"pass not_after_step >= {steps[0]}"
        )
    return eligible[-1]


def _copy_into(source: Path, staging: Path) -> None:
    for entry in source.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, staging / entry.name)
        else:
            shutil.copy2(entry, staging / entry.name)


def fork_checkpoints(source: Path, destination: Path, not_after_step: int | None) -> int:
    """Copy one step from the ``source`` checkpoints directory into ``destination``'s; returns the step.

    The step keeps its number (the fork resumes training at it, as in ART). The copy goes into a temporary
    sibling, is fsynced, then renamed into place. A destination that already has checkpoints is refused:
    its own latest step would win on resume.
    """
    step = pick_step(checkpoint_steps(source), not_after_step, source)
    existing = checkpoint_steps(destination)
    if existing:
        raise ValueError(
            f"{destination} already has checkpoints at steps {existing}; fork into a model name with no "
            "checkpoints (or delete that model's checkpoints directory first)"
        )
    write_atomically(destination / f"{step:04d}", lambda staging: _copy_into(source / f"{step:04d}", staging))
    return step

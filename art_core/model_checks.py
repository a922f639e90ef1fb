"""Checks of ``Model`` arguments and ``Model.log`` inputs: names, splits, metrics, steps and unknown fields."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import pydantic

from art_core.trajectories import Trajectory, TrajectoryGroup, check_groups

NAME_MAX_LENGTH = 128
_SPLIT_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def validate_name(value: str, what: str) -> str:
    """A model or project name becomes a directory: refuse anything that could escape or break it."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    problems = []
    if not value or value.strip() != value:
        problems.append("is empty or has surrounding whitespace")
    if len(value) > NAME_MAX_LENGTH:
        problems.append(f"is longer than {NAME_MAX_LENGTH} characters")
    if "/" in value or "\\" in value:
        problems.append("contains a path separator")
    if ".." in value or value == ".":
        problems.append("contains '..' or is '.'")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        problems.append("contains a NUL or control character")
    if problems:
        raise ValueError(
            f"{what} {value[:NAME_MAX_LENGTH]!r} {' and '.join(problems)}; use letters, digits, '-', '_' and '.' "
            "(for example 'agent-001')"
        )
    return value


# Inference names carry the step after these ("agent@3" locally, "...:step3" serverless), so a model name that
# holds one would be read back as another model's step and answer 404.
_SERVING_SEPARATORS = {"@": "name@step", ":": "name:stepN"}


def validate_model_name(value: str) -> str:
    """A model name is a directory and an inference name: ``validate_name`` plus no step separator."""
    validate_name(value, "model name")
    for char, form in _SERVING_SEPARATORS.items():
        if char in value:
            suggestion = value.replace("@", "-").replace(":", "-")
            raise ValueError(
                f"model name {value!r} contains {char!r}, which inference names use to pick a step ({form}), so "
                f"this model could not be served under its own name; use letters, digits, '-', '_' and '.', "
                f"e.g. {suggestion!r}"
            )
    return value


def validate_split(split: str) -> str:
    """A split becomes a directory name: a plain name such as 'train' or 'val'."""
    if not isinstance(split, str):
        raise TypeError(f"split must be a string such as 'train' or 'val', not {type(split).__name__}")
    if not _SPLIT_PATTERN.match(split) or ".." in split:
        raise ValueError(f"split {split!r} is not a plain name; use e.g. 'train', 'val' or 'test'")
    return split


def check_metrics(metrics: object) -> dict[str, float]:
    """``metrics`` as name → float; TypeError naming the first key that is not a string or a number."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of name → number, not {type(metrics).__name__}")
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric name {key!r} is a {type(key).__name__}; names must be strings")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy and torch scalars
            except (TypeError, ValueError):
                raise TypeError(
                    f"metric {key!r} is a {type(value).__name__}; metric values must be numbers"
                ) from None
        checked[key] = float(value)
    return checked


def check_step(step: object) -> int:
    """``step`` as a non-negative int."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, not {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step={step} is negative")
    return step


def coerce_groups(value: object) -> list[TrajectoryGroup]:
    """The groups to log: a list of groups, or ART's flat batch of trajectories as one group."""
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, (Trajectory, BaseException)) for v in value)
    ):
        return [TrajectoryGroup(value)]  # ART accepts a flat batch of trajectories as one group
    return check_groups(value, allow_empty=True)


def known_fields(cls: type[pydantic.BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without an empty ``_internal_config``; a ``TypeError`` for any key ``cls`` has no field for.

    The error names each unknown key with the closest field (``difflib``), so ``typo_option=3`` or
    ``base_modle=...`` fails at construction instead of being ignored.
    """
    fields = dict(data)
    if "_internal_config" in fields:
        from art_core.migration import internal_config_error

        message = internal_config_error(fields.pop("_internal_config"))
        if message is not None:
            raise TypeError(message)
    known = sorted({*cls.model_fields, *(f.alias for f in cls.model_fields.values() if f.alias)})
    unknown = [key for key in fields if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise TypeError(
            f"{cls.__name__}() got unexpected keyword argument(s) {', '.join(hints)}; "
            f"its fields are: {', '.join(known)}"
        )
    return fields

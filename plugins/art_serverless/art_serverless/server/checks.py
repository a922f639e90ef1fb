"""Checks of a training job's body before it is queued: each bad value is a 422 that says where it is.

FastAPI has already parsed the body as JSON, which lets ``NaN`` and ``Infinity`` through and leaves the groups as
plain data, so these checks run on that data first (no non-finite number anywhere, lists where lists belong,
policy versions that are steps), then each group goes through ``TrajectoryGroup`` and ``check_groups``.
"""

from __future__ import annotations

import math
from typing import Any

import pydantic

from art_core.plugin_api import check_groups
from art_core.trajectories import TrajectoryGroup
from art_serverless.server.state import ApiError, validation_message

# Policy versions are training steps; the store keeps steps as SQLite integers (64-bit).
MAX_STEP = 2**63 - 1
_LIST_FIELDS = ("trajectories", "exceptions", "logs")
_TRAJECTORY_LIST_FIELDS = ("messages_and_choices", "additional_histories", "logs")
_POLICY_VERSIONS = ("initial_policy_version", "final_policy_version")


def first_non_finite(value: Any, where: str) -> tuple[str, float] | None:
    """The path and value of the first NaN or infinity inside ``value`` (walked without recursion)."""
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path, item
        if isinstance(item, dict):
            stack.extend((f"{path}.{key}", child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{index}]", child) for index, child in reversed(list(enumerate(item))))
    return None


def _check_shape(raw: dict[str, Any], where: str) -> None:
    """Lists where the group and its trajectories hold lists, and policy versions that are steps."""
    for key in _LIST_FIELDS:
        if key in raw and not isinstance(raw[key], list):
            raise ApiError(422, f"{where}.{key} is a {type(raw[key]).__name__}; it must be a list")
    for index, trajectory in enumerate(raw.get("trajectories", [])):
        if not isinstance(trajectory, dict):
            continue  # pydantic names it
        for key in _TRAJECTORY_LIST_FIELDS:
            value = trajectory.get(key)
            if value is not None and not isinstance(value, list):
                raise ApiError(
                    422, f"{where}.trajectories[{index}].{key} is a {type(value).__name__}; it must be a list"
                )
        for key in _POLICY_VERSIONS:
            value = trajectory.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_STEP:
                raise ApiError(
                    422,
                    f"{where}.trajectories[{index}].{key}={value} is not a training step; "
                    f"it must lie in [0, {MAX_STEP}] or be null",
                )


def parse_groups(raw_groups: list[dict[str, Any]]) -> list[TrajectoryGroup]:
    """Validate each group of a job body, naming the first bad value (ApiError 422)."""
    if not raw_groups:
        raise ApiError(422, "trajectory_groups is empty; send at least one group")
    bad = first_non_finite(raw_groups, "trajectory_groups")
    if bad is not None:
        raise ApiError(
            422, f"{bad[0]} is {bad[1]}; every number in a training job must be finite (no NaN or Infinity)"
        )
    groups = []
    for index, raw in enumerate(raw_groups):
        _check_shape(raw, f"trajectory_groups[{index}]")
        try:
            groups.append(TrajectoryGroup.model_validate(raw))
        except pydantic.ValidationError as error:
            raise ApiError(
                422, f"trajectory_groups[{index}] is invalid: {validation_message(error.errors())}"
            ) from None
        except (TypeError, ValueError) as error:  # TrajectoryGroup.__init__ on a value of the wrong shape
            raise ApiError(422, f"trajectory_groups[{index}] is invalid: {error}") from None
    try:
        return check_groups(groups)
    except (TypeError, ValueError) as error:
        raise ApiError(422, str(error)) from None

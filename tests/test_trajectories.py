"""Trajectory types: the trainable Choice marker, reward checks, awaitable groups."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from core_support import make_choice, make_trajectory
from openai.types.chat.chat_completion import Choice

import art_core as art
from art_core.trajectories import check_groups, get_messages


def test_choice_survives_a_json_round_trip() -> None:
    trajectory = make_trajectory(1.0)
    restored = art.Trajectory.model_validate_json(trajectory.model_dump_json())
    choice = restored.messages_and_choices[2]
    assert isinstance(choice, Choice)  # ART turns it into a plain dict here and loses what to train
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert [lp.token for lp in choice.logprobs.content] == ["token_id:5", "token_id:6", "token_id:7"]
    assert isinstance(restored.messages_and_choices[0], dict)


def test_group_round_trip_through_plain_json_keeps_choices_and_exceptions() -> None:
    group = art.TrajectoryGroup([make_trajectory(0.0), make_trajectory(1.0), RuntimeError("rollout failed")])
    payload = json.loads(group.model_dump_json())
    restored = art.TrajectoryGroup.model_validate(payload)
    assert [t.reward for t in restored] == [0.0, 1.0]
    assert all(isinstance(t.messages_and_choices[2], Choice) for t in restored)
    assert restored.exceptions[0].message == "rollout failed"
    assert "RuntimeError" in restored.exceptions[0].type


def test_get_messages_turns_choices_into_assistant_messages() -> None:
    messages = get_messages(make_trajectory(1.0, text="xyz").messages_and_choices)
    assert messages[-1] == {"role": "assistant", "content": "xyz"}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_is_refused_at_construction(bad: float) -> None:
    with pytest.raises(ValueError, match="rewards must be finite"):
        art.Trajectory(reward=bad)


def test_non_finite_reward_set_later_names_group_and_trajectory() -> None:
    groups = [
        art.TrajectoryGroup([make_trajectory(0.0)]),
        art.TrajectoryGroup([make_trajectory(0.0) for _ in range(4)]),
    ]
    groups[1].trajectories[3].reward = math.nan
    with pytest.raises(ValueError, match=r"trajectory 3 in group 1 is nan"):
        check_groups(groups)


def test_messages_must_be_messages_or_choices() -> None:
    with pytest.raises(ValueError, match="no 'role'"):
        art.Trajectory(messages_and_choices=[{"content": "hi"}])
    with pytest.raises(ValueError, match="holds a int"):
        art.Trajectory(messages_and_choices=[3])  # type: ignore[list-item]


def test_check_groups_names_wrong_types() -> None:
    with pytest.raises(TypeError, match="not a single TrajectoryGroup"):
        check_groups(art.TrajectoryGroup([make_trajectory(1.0)]))
    with pytest.raises(TypeError, match=r"\[1\] is a str"):
        check_groups([art.TrajectoryGroup([make_trajectory(1.0)]), "oops"])


async def test_group_over_awaitables_is_awaitable_and_keeps_failures() -> None:
    async def rollout(i: int) -> art.Trajectory:
        await asyncio.sleep(0.001 * i)
        if i == 2:
            raise ValueError("env crashed")
        return make_trajectory(float(i))

    pending = art.TrajectoryGroup((rollout(i) for i in range(4)), metadata={"scenario_id": "s1"})
    assert pending.pending == 4 and len(pending) == 0
    with pytest.raises(TypeError, match="4 rollouts not awaited"):
        check_groups([pending])
    group = await pending
    assert group is pending and group.pending == 0
    assert await group is group  # awaiting a finished group returns it
    assert sorted(t.reward for t in group) == [0.0, 1.0, 3.0]
    assert len(group.exceptions) == 1 and "env crashed" in group.exceptions[0].message
    assert group.metadata == {"scenario_id": "s1"}


def test_a_group_of_finished_trajectories_and_awaitables_mixed_is_refused() -> None:
    async def rollout() -> art.Trajectory:
        return make_trajectory(1.0)

    coroutine = rollout()
    with pytest.raises(TypeError, match="not a mix"):
        art.TrajectoryGroup([make_trajectory(0.0), coroutine])  # type: ignore[list-item]
    coroutine.close()


def test_choice_objects_are_the_trainable_ones() -> None:
    trajectory = make_trajectory(1.0)
    assert trajectory.choices() == [trajectory.messages_and_choices[2]]
    assert isinstance(make_choice(), Choice)

"""gather_trajectory_groups / gather_trajectories: failures budget, after_each, progress bar."""

from __future__ import annotations

import asyncio

import pytest
from core_support import make_trajectory

import art_core as art


async def rollout(reward: float, fail: bool = False) -> art.Trajectory:
    await asyncio.sleep(0)
    if fail:
        raise RuntimeError(f"rollout {reward} failed")
    return make_trajectory(reward)


async def test_gather_returns_groups_with_failures_within_count_budget() -> None:
    groups = await art.gather_trajectory_groups(
        (art.TrajectoryGroup(rollout(r, fail=(g == 0 and r == 0)) for r in range(4)) for g in range(3)),
        max_exceptions=1,
        pbar_desc=None,
    )
    assert [len(g) for g in groups] == [3, 4, 4]
    assert len(groups[0].exceptions) == 1


async def test_too_many_failures_raise_with_the_last_failure_as_cause() -> None:
    with pytest.raises(art.TooManyExceptionsError, match="2 of 8 rollouts failed") as info:
        await art.gather_trajectory_groups(
            [art.TrajectoryGroup(rollout(r, fail=r < 2) for r in range(4)) for _ in range(2)],
            max_exceptions=1,
            pbar_desc=None,
        )
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_fractional_budget_is_a_share_of_all_rollouts() -> None:
    def batch() -> list[art.TrajectoryGroup]:
        return [art.TrajectoryGroup(rollout(r, fail=(g == 0 and r < 2)) for r in range(5)) for g in range(2)]

    groups = await art.gather_trajectory_groups(
        batch(), max_exceptions=0.2, pbar_desc=None
    )  # 2 of 10 allowed
    assert sum(len(g.exceptions) for g in groups) == 2
    with pytest.raises(art.TooManyExceptionsError):
        await art.gather_trajectory_groups(batch(), max_exceptions=0.1, pbar_desc=None)


async def test_negative_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        await art.gather_trajectory_groups([], max_exceptions=-1)


async def test_after_each_can_replace_split_or_drop_groups() -> None:
    async def after(group: art.TrajectoryGroup) -> art.TrajectoryGroup | list[art.TrajectoryGroup] | None:
        best = max(t.reward for t in group)
        if best == 0:
            return None
        if best == 3:
            return [art.TrajectoryGroup(group.trajectories[:2]), art.TrajectoryGroup(group.trajectories[2:])]
        group.metadata["seen"] = True
        return group

    groups = await art.gather_trajectory_groups(
        [
            art.TrajectoryGroup(rollout(0.0) for _ in range(2)),
            art.TrajectoryGroup(rollout(float(r)) for r in range(4)),
            art.TrajectoryGroup(rollout(float(r)) for r in range(2)),
        ],
        after_each=after,
        pbar_desc=None,
    )
    assert [len(g) for g in groups] == [2, 2, 2]
    assert groups[2].metadata == {"seen": True}


async def test_progress_bar_shows_live_reward_and_exceptions(capsys: pytest.CaptureFixture[str]) -> None:
    await art.gather_trajectory_groups(
        [art.TrajectoryGroup(rollout(float(r), fail=r == 3) for r in range(4))],
        max_exceptions=1,
        pbar_desc="gather",
    )
    err = capsys.readouterr().err
    assert "4/4" in err
    assert "reward=1" in err and "exceptions=1" in err


async def test_gather_trajectories_keeps_tolerated_failures_in_place() -> None:
    results = await art.gather_trajectories(
        [rollout(1.0), rollout(2.0, fail=True), rollout(3.0)], max_exceptions=1, pbar_desc=None
    )
    assert isinstance(results[0], art.Trajectory) and isinstance(results[1], RuntimeError)


async def test_non_finite_reward_after_gather_names_group_and_trajectory() -> None:
    async def nan_rollout() -> art.Trajectory:
        trajectory = make_trajectory(0.0)
        trajectory.reward = float("nan")
        return trajectory

    with pytest.raises(ValueError, match=r"trajectory 0 in group 1 is nan"):
        await art.gather_trajectory_groups(
            [art.TrajectoryGroup([rollout(1.0)]), art.TrajectoryGroup([nan_rollout()])], pbar_desc=None
        )


async def test_progress_bar_can_clear_itself_when_done(capsys: pytest.CaptureFixture[str]) -> None:
    for leave in (True, False):
        await art.gather_trajectory_groups(
            [art.TrajectoryGroup(rollout(1.0) for _ in range(2))], pbar_desc="gather", pbar_leave=leave
        )
        err = capsys.readouterr().err
        assert "gather:" in err and ("2/2" in err) is leave
        assert err.endswith("\n") is leave  # a kept bar ends its line; a cleared one leaves the cursor there


async def hung(reward: float) -> art.Trajectory:
    await asyncio.sleep(3600)
    return make_trajectory(reward)


async def test_a_hung_rollout_times_out_and_counts_as_a_failure() -> None:
    groups = await asyncio.wait_for(
        art.gather_trajectory_groups(
            [art.TrajectoryGroup([rollout(1.0), hung(0.0)]), art.TrajectoryGroup([rollout(0.5)])],
            max_exceptions=1,
            rollout_timeout_s=0.2,
            pbar_desc=None,
        ),
        timeout=10,
    )
    assert [len(g) for g in groups] == [1, 1]
    assert groups[0].exceptions[0].type == "art_core.gather.RolloutTimeoutError"
    assert "rollout_timeout_s=0.2" in groups[0].exceptions[0].message


async def test_hung_rollouts_beyond_the_budget_raise() -> None:
    async def whole_group() -> art.TrajectoryGroup:
        await asyncio.sleep(3600)
        return art.TrajectoryGroup([make_trajectory(0.0)])

    with pytest.raises(art.TooManyExceptionsError) as raised:
        await asyncio.wait_for(
            art.gather_trajectory_groups([whole_group()], rollout_timeout_s=0.1, pbar_desc=None), timeout=10
        )
    assert isinstance(raised.value.__cause__, art.RolloutTimeoutError)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
async def test_a_rollout_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="rollout_timeout_s"):
        await art.gather_trajectory_groups([], rollout_timeout_s=bad, pbar_desc=None)

"""RULER against a real HTTP judge whose answers each test scripts: well-formed, malformed, short, cut off,
slow, 5xx and 400; the cache; and scoring from gather_trajectory_groups(after_each=...)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from judge_server import JudgeServer, Reply, judge_server, scores_json
from openai import AsyncOpenAI

import art_core as art
from art_core.rewards import RulerError, RulerStats, ruler_score_group
from art_core.rewards.prompt import JudgeAnswerError, parse_scores

SYSTEM = {"role": "system", "content": "You plan trips. SHARED-SYSTEM-PROMPT"}
USER = {"role": "user", "content": "Plan a day in Lyon."}


@pytest.fixture
def judge() -> Iterator[JudgeServer]:
    yield from judge_server()


def client_for(server: JudgeServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0)


def group(*answers: str, reward: float = 0.0) -> art.TrajectoryGroup:
    return art.TrajectoryGroup(
        art.Trajectory(
            messages_and_choices=[SYSTEM, USER, {"role": "assistant", "content": a}],
            reward=reward,
            logs=["rollout log"],
        )
        for a in answers
    )


def user_text(request: dict[str, Any]) -> str:
    return str(request["messages"][1]["content"])


async def score(server: JudgeServer, g: art.TrajectoryGroup, **options: Any) -> art.TrajectoryGroup | None:
    options.setdefault("stats", RulerStats())
    return await ruler_score_group(g, "judge-model", client=client_for(server), **options)


async def test_scores_replace_rewards_and_keep_the_explanation(judge: JudgeServer) -> None:
    judge.script(scores_json(0.9, 0.1, 0.5))
    scored = await score(judge, group("museum, lunch, river", "stay in bed", "lunch only", reward=0.25))
    assert scored is not None
    assert [t.reward for t in scored.trajectories] == [0.9, 0.1, 0.5]
    first = scored.trajectories[0]
    assert first.metrics == {"independent_reward": 0.25, "ruler_score": 0.9}
    assert first.logs == ["rollout log", "RULER explanation: because 1"]
    (request,) = judge.requests
    assert request["model"] == "judge-model"
    assert request["response_format"]["type"] == "json_schema"
    text = user_text(request)
    assert text.count("SHARED-SYSTEM-PROMPT") == 1 and text.startswith("<context>")  # the shared prefix, once
    assert text.count("<trajectory id=") == 3 and "stay in bed" in text


async def test_the_rubric_is_replaceable(judge: JudgeServer) -> None:
    judge.script(scores_json(1, 0))
    await score(judge, group("a", "b"), rubric="- Shorter answers win. RUBRIC-MARKER")
    system = judge.requests[0]["messages"][0]["content"]
    assert "RUBRIC-MARKER" in system and "reaches its goal" not in system


@pytest.mark.parametrize(
    "bad",
    [
        Reply("I think the first one is best."),  # not JSON
        Reply(scores_json(0.9, 0.1)),  # short: 2 scores for 3 trajectories
        Reply(scores_json(0.9, 0.1, 0.5)[:-10], finish_reason="length"),  # cut off at max_tokens
        Reply(scores_json(0.9, 1.5, 0.5)),  # out of range
        Reply(status=503, content="overloaded"),
        Reply(scores_json(0.9, 0.1, 0.5), delay=1.5),  # slower than request_timeout
    ],
    ids=["malformed", "short", "truncated", "out-of-range", "5xx", "slow"],
)
async def test_a_bad_answer_is_retried(judge: JudgeServer, bad: Reply) -> None:
    judge.script(bad, scores_json(0.2, 0.3, 0.4))
    stats = RulerStats()
    scored = await score(judge, group("a", "b", "c"), stats=stats, request_timeout=0.5)
    assert scored is not None and [t.reward for t in scored.trajectories] == [0.2, 0.3, 0.4]
    assert (len(judge.requests), stats.requests, stats.retries) == (2, 2, 1)


async def test_no_usable_answer_is_a_clear_error_or_a_counted_skip(judge: JudgeServer) -> None:
    judge.script(*[scores_json(0.5)] * 3)
    with pytest.raises(
        RulerError, match=r"3 attempts.*ids \['1'\].*ids \['1', '2'\].*swallow_exceptions=True"
    ):
        await score(judge, group("a", "b"), max_attempts=3)
    judge.script(*[scores_json(0.5)] * 2)
    stats = RulerStats()
    assert await score(judge, group("a", "b"), max_attempts=2, swallow_exceptions=True, stats=stats) is None
    assert (stats.skipped_groups, stats.judged_groups) == (1, 0)
    assert "JudgeAnswerError" in (stats.last_error or "") or "RulerError" in (stats.last_error or "")


async def test_a_refused_request_is_not_retried_and_says_what_to_try(judge: JudgeServer) -> None:
    judge.script(Reply(status=400, content="response_format is not supported"))
    with pytest.raises(RulerError, match="structured_output=False"):
        await score(judge, group("a", "b"))
    assert len(judge.requests) == 1


async def test_without_structured_output_the_answer_is_still_parsed_strictly(judge: JudgeServer) -> None:
    judge.script("```json\n" + scores_json(0.0, 1.0) + "\n```")
    scored = await score(judge, group("a", "b"), structured_output=False)
    assert scored is not None and [t.reward for t in scored.trajectories] == [0.0, 1.0]
    assert "response_format" not in judge.requests[0]


async def test_identical_trajectories_are_shown_once(judge: JudgeServer) -> None:
    judge.script(scores_json(0.7))
    scored = await score(judge, group("same", "same", "same"))
    assert scored is not None and [t.reward for t in scored.trajectories] == [0.7, 0.7, 0.7]
    assert user_text(judge.requests[0]).count("<trajectory id=") == 1


async def test_the_cache_answers_a_repeated_request(judge: JudgeServer, tmp_path: Path) -> None:
    judge.script(scores_json(0.9, 0.1), scores_json(0.4, 0.6))
    stats = RulerStats()
    first = await score(judge, group("a", "b"), cache_dir=tmp_path, stats=stats)
    again = await score(judge, group("a", "b"), cache_dir=tmp_path, stats=stats)
    assert first is not None and again is not None
    assert [t.reward for t in again.trajectories] == [0.9, 0.1]
    assert (len(judge.requests), stats.cache_hits) == (1, 1)
    entries = list(tmp_path.rglob("*"))
    assert not [p for p in entries if p.name.endswith(".tmp")]  # written atomically
    (entry,) = [p for p in entries if p.is_file()]
    assert json.loads(entry.read_text())["content"] == scores_json(0.9, 0.1)
    changed = await score(judge, group("a", "b"), cache_dir=tmp_path, rubric="- other", stats=stats)
    assert changed is not None and [t.reward for t in changed.trajectories] == [0.4, 0.6]
    assert len(judge.requests) == 2  # another request, another key


async def test_after_each_scores_every_group_and_skips_failed_ones(judge: JudgeServer) -> None:
    judge.script(scores_json(1.0, 0.0), "garbage", "garbage")
    stats = RulerStats()
    client = client_for(judge)

    async def one(answer: str) -> art.Trajectory:
        return art.Trajectory(messages_and_choices=[USER, {"role": "assistant", "content": answer}])

    groups = await art.gather_trajectory_groups(
        [art.TrajectoryGroup([one("x"), one("y")])],
        after_each=lambda g: ruler_score_group(
            g, "judge-model", client=client, swallow_exceptions=True, max_attempts=1, stats=stats
        ),
        pbar_desc=None,
    )
    assert [t.reward for t in groups[0].trajectories] == [1.0, 0.0]
    skipped = await art.gather_trajectory_groups(
        [group("p", "q"), group("r", "s")],
        after_each=lambda g: ruler_score_group(
            g, "judge-model", client=client, swallow_exceptions=True, max_attempts=1, stats=stats
        ),
        pbar_desc=None,
    )
    assert skipped == [] and (stats.judged_groups, stats.skipped_groups) == (1, 2)


async def test_art_style_params_build_the_client(judge: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge.script(scores_json(0.3, 0.6))
    params = {"api_base": judge.url, "api_key": "test", "temperature": 0.0}
    scored = await ruler_score_group(group("a", "b"), "openai/o4-mini", params, stats=RulerStats())
    assert scored is not None and [t.reward for t in scored.trajectories] == [0.3, 0.6]
    assert judge.requests[0]["model"] == "o4-mini" and judge.requests[0]["temperature"] == 0.0


async def test_without_a_client_or_key_the_error_says_how_to_pass_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"client=AsyncOpenAI\(base_url="):
        await ruler_score_group(group("a", "b"), "o4-mini")


def test_parsing_is_strict() -> None:
    assert [
        s.score
        for s in parse_scores('{"scores": [{"trajectory_id": "1", "explanation": "", "score": 1}]}', 1)
    ] == [1.0]
    swapped = json.dumps(
        {"scores": [{"trajectory_id": i, "explanation": "", "score": 0.5} for i in ("2", "1")]}
    )
    assert [s.trajectory_id for s in parse_scores(swapped, 2)] == ["1", "2"]  # back in trajectory order
    for bad in [
        '{"scores": [{"trajectory_id": 1, "explanation": "", "score": 1}]}',  # id not a string
        '{"scores": [{"trajectory_id": "1", "explanation": "", "score": "1"}]}',  # score not a number
        '{"scores": [{"trajectory_id": "1", "explanation": "", "score": 1, "extra": 0}]}',
        '{"scores": [{"trajectory_id": "1", "explanation": "", "score": NaN}]}',
    ]:
        with pytest.raises(JudgeAnswerError):
            parse_scores(bad, 1)
    duplicated = json.dumps({"scores": [{"trajectory_id": "1", "explanation": "", "score": 0.5}] * 2})
    with pytest.raises(JudgeAnswerError, match=r"ids \['1', '1'\]"):
        parse_scores(duplicated, 2)

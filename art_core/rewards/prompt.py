"""What RULER sends the judge (one request for a whole group) and how it reads the answer back, strictly."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import pydantic

DEFAULT_RUBRIC = """\
- A trajectory that reaches its goal must score clearly higher than one that does not.
- Between two that reach it, the one that gets there more directly (fewer wasted turns or tool calls) scores higher.
- Make the gap between two scores match how different their quality is: small for small differences.
- Progress toward the goal without reaching it earns partial credit.
"""
"""The default grading standards; the task itself is read from the trajectories (their system prompts)."""

JUDGE_INSTRUCTIONS = """\
Several trajectories below were all given the same goal. Judge each one against the others and give it a \
score between 0 and 1, using your best understanding of what the agent was asked to do.

Grading standards:
{rubric}
Answer with JSON only, in exactly this shape, with one entry per trajectory id:
{{"scores": [{{"trajectory_id": "1", "explanation": "one or two sentences", "score": 0.5}}]}}
"""

SCORES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "scores": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "trajectory_id": {"type": "string"},
                    "explanation": {"type": "string"},
                    "score": {"type": "number"},
                },
                "required": ["trajectory_id", "explanation", "score"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["scores"],
    "additionalProperties": False,
}
RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "ruler_scores", "schema": SCORES_SCHEMA, "strict": True},
}


class JudgeAnswerError(ValueError):
    """The judge's answer is not the JSON it was asked for (retried; see ``ruler``'s ``max_attempts``)."""


class TrajectoryScore(pydantic.BaseModel):
    """The judge's score of one trajectory, with its explanation."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    trajectory_id: str
    explanation: str
    score: float


class _Answer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    scores: list[TrajectoryScore]


def common_prefix_length(message_lists: Sequence[Sequence[Any]]) -> int:
    """How many leading messages every list shares."""
    shortest = min(len(messages) for messages in message_lists)
    for index in range(shortest):
        if any(messages[index] != message_lists[0][index] for messages in message_lists[1:]):
            return index
    return shortest


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def judge_messages(message_lists: Sequence[Sequence[Any]], rubric: str) -> tuple[list[dict[str, str]], int]:
    """The judge's two messages and how many trajectories it is shown (1 when all are identical).

    Messages every trajectory starts with are sent once, as ``<context>``; identical trajectories are sent
    once and the one score is given to each.
    """
    prefix = common_prefix_length(message_lists)
    identical = all(len(messages) == prefix for messages in message_lists)
    shown = [message_lists[0]] if identical else [messages[prefix:] for messages in message_lists]
    context = (
        ""
        if identical or prefix == 0
        else f"<context>\n{_dumps(list(message_lists[0][:prefix]))}\n</context>\n\n"
    )
    body = "\n\n".join(
        f'<trajectory id="{index}">\n{_dumps(list(messages))}\n</trajectory>'
        for index, messages in enumerate(shown, 1)
    )
    system = JUDGE_INSTRUCTIONS.format(rubric=rubric.strip() + "\n")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"{context}Trajectories:\n\n{body}"},
    ], len(shown)


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.S)


def parse_scores(
    content: str | None, expected: int, finish_reason: str | None = None
) -> list[TrajectoryScore]:
    """The ``expected`` scores of a judge's answer in trajectory order, or ``JudgeAnswerError`` saying why not.

    Strict: valid JSON of exactly the asked shape (a surrounding ```json fence is tolerated), ids "1".."n"
    each exactly once, every score a finite number in [0, 1].
    """
    if finish_reason == "length":
        raise JudgeAnswerError(
            "the answer was cut off (finish_reason='length'); raise max_tokens for the judge"
        )
    text = (content or "").strip()
    fenced = _FENCE.match(text)
    try:
        answer = _Answer.model_validate_json(fenced[1] if fenced else text)
    except pydantic.ValidationError as error:
        raise JudgeAnswerError(
            f"the answer is not the asked JSON ({error.errors()[0]['msg']}): {text[:200]!r}"
        ) from None
    by_id = {score.trajectory_id: score for score in answer.scores}
    wanted = [str(index) for index in range(1, expected + 1)]
    if len(answer.scores) != expected or sorted(by_id) != sorted(wanted):
        ids = [score.trajectory_id for score in answer.scores]
        raise JudgeAnswerError(f"the answer scores trajectory ids {ids} but the judge was shown ids {wanted}")
    bad = [score for score in answer.scores if not (math.isfinite(score.score) and 0.0 <= score.score <= 1.0)]
    if bad:
        raise JudgeAnswerError(
            f"trajectory {bad[0].trajectory_id} got score {bad[0].score}; scores must be in [0, 1]"
        )
    return [by_id[trajectory_id] for trajectory_id in wanted]

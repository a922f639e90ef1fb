"""RULER: an LLM judge scores a group's trajectories relative to each other, in one request, as rewards.

GRPO only needs rewards that rank a group's trajectories, and ranking several attempts side by side is easier
for a judge than scoring one in isolation. Any OpenAI-compatible endpoint can judge (``client=AsyncOpenAI(...)``).
``openai`` is imported only when a group is scored.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from art_core.rewards.cache import JudgeCache, request_key
from art_core.rewards.prompt import (
    DEFAULT_RUBRIC,
    RESPONSE_FORMAT,
    JudgeAnswerError,
    TrajectoryScore,
    judge_messages,
    parse_scores,
)
from art_core.trajectories import Trajectory, TrajectoryGroup

if TYPE_CHECKING:
    from openai import AsyncOpenAI

logger = logging.getLogger("art_core.rewards")

DEFAULT_JUDGE_MODEL = "openai/o3"
_CLIENT_KEYS = {"api_base": "base_url", "base_url": "base_url", "api_key": "api_key"}
_RETRY_DELAY_S = 0.5


class RulerError(RuntimeError):
    """The judge gave no usable scores within ``max_attempts``; the last failure is the ``__cause__``."""


@dataclass
class RulerStats:
    """Running counts of RULER's work (``ruler_stats`` by default; pass ``stats=`` for your own)."""

    judged_groups: int = 0
    skipped_groups: int = 0
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    last_error: str | None = None


ruler_stats = RulerStats()


def _split_params(
    judge_model: str, params: dict[str, Any] | None, client: AsyncOpenAI | None
) -> tuple[AsyncOpenAI, str, dict[str, Any]]:
    """The client to ask, the model name it knows and the extra ``create()`` arguments.

    Without ``client``, one is built from the environment (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``) and from
    litellm-style ``api_base``/``api_key`` params, and litellm's ``openai/`` routing prefix is dropped.
    """
    params = dict(params or {})
    client_options = {_CLIENT_KEYS[key]: params.pop(key) for key in list(params) if key in _CLIENT_KEYS}
    if client is not None:
        if client_options:
            raise ValueError(f"pass {sorted(client_options)} either in params or through client=, not both")
        return client, judge_model, params
    from openai import AsyncOpenAI, OpenAIError

    try:
        built = AsyncOpenAI(max_retries=2, **client_options)
    except OpenAIError as error:
        raise ValueError(
            f"cannot build a judge client from the environment ({error}); pass "
            "client=AsyncOpenAI(base_url=..., api_key=...) for the judge's OpenAI-compatible endpoint"
        ) from error
    return built, judge_model.removeprefix("openai/"), params


def _retryable() -> tuple[type[BaseException], ...]:
    import openai

    return (
        JudgeAnswerError,
        TimeoutError,
        openai.APITimeoutError,
        openai.APIConnectionError,
        openai.InternalServerError,
        openai.RateLimitError,
    )


async def _ask(
    client: AsyncOpenAI, request: dict[str, Any], expected: int, seconds: float
) -> tuple[str, list[TrajectoryScore]]:
    """One judge request, bounded by ``seconds`` in all; returns the answer and its parsed scores."""
    try:
        completion = await asyncio.wait_for(
            client.chat.completions.create(**request, timeout=seconds), seconds
        )
    except TimeoutError:
        raise TimeoutError(f"the judge did not answer within request_timeout={seconds} s") from None
    if not completion.choices:
        raise JudgeAnswerError("the judge's response has no choices")
    choice = completion.choices[0]
    content = choice.message.content or ""
    return content, parse_scores(content, expected, choice.finish_reason)


async def ruler(
    message_lists: Sequence[Sequence[Any]],
    judge_model: str = DEFAULT_JUDGE_MODEL,
    extra_litellm_params: dict[str, Any] | None = None,
    rubric: str = DEFAULT_RUBRIC,
    *,
    client: AsyncOpenAI | None = None,
    structured_output: bool = True,
    max_attempts: int = 3,
    request_timeout: float = 300.0,
    cache_dir: str | os.PathLike[str] | None = None,
    stats: RulerStats | None = None,
    debug: bool = False,
) -> list[TrajectoryScore]:
    """Score each message list relative to the others with one judge request; scores are in list order.

    ``extra_litellm_params`` (ART's name) are extra ``chat.completions.create`` arguments such as
    ``{"temperature": 0}``. ``structured_output=False`` leaves out ``response_format`` (for servers without
    JSON-schema output); the answer is parsed as strictly either way. A malformed, short or cut-off answer,
    no answer within ``request_timeout`` seconds, a 5xx or a 429 is retried up to ``max_attempts`` in all, then ``RulerError``. With
    ``cache_dir``, answers are stored under the hash of the whole request and reused.
    """
    if not message_lists:
        return []
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts={max_attempts!r} must be an int of at least 1")
    if not request_timeout > 0:
        raise ValueError(f"request_timeout={request_timeout!r} must be a positive number of seconds")
    stats = ruler_stats if stats is None else stats
    judge, model_name, extra = _split_params(judge_model, extra_litellm_params, client)
    messages, shown = judge_messages(message_lists, rubric)
    request = {"model": model_name, "messages": messages, **extra}
    if structured_output:
        request["response_format"] = RESPONSE_FORMAT
    scores = await _scores(judge, request, shown, max_attempts, request_timeout, cache_dir, stats, debug)
    if shown == 1 and len(message_lists) > 1:  # identical trajectories: the one score is everyone's
        scores = [
            scores[0].model_copy(update={"trajectory_id": str(i)}) for i in range(1, len(message_lists) + 1)
        ]
    return scores


async def _scores(
    judge: AsyncOpenAI,
    request: dict[str, Any],
    shown: int,
    max_attempts: int,
    seconds: float,
    cache_dir: str | os.PathLike[str] | None,
    stats: RulerStats,
    debug: bool,
) -> list[TrajectoryScore]:
    """The cached answer to ``request`` if there is one, else ask (and retry) the judge."""
    cache = JudgeCache(cache_dir) if cache_dir is not None else None
    key = request_key(request)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        try:
            scores = parse_scores(cached, shown)
        except JudgeAnswerError:
            pass  # an entry from another version of the parser: ask again
        else:
            stats.cache_hits += 1
            return scores
    import openai

    retryable = _retryable()
    for attempt in range(1, max_attempts + 1):
        stats.requests += 1
        try:
            content, scores = await _ask(judge, request, shown, seconds)
        except retryable as error:
            failure: BaseException = error
            if attempt < max_attempts:
                stats.retries += 1
                if not isinstance(error, JudgeAnswerError):
                    await asyncio.sleep(_RETRY_DELAY_S * 2 ** (attempt - 1))
            continue
        except openai.BadRequestError as error:
            hint = (
                " (if the server rejects response_format, pass structured_output=False)"
                if "response_format" in request
                else ""
            )
            raise RulerError(f"judge {request['model']!r} refused the request: {error}{hint}") from error
        if debug:
            print(f"[RULER] judge answer: {content}")
        if cache is not None:
            cache.put(key, content)
        return scores
    raise RulerError(
        f"judge {request['model']!r} gave no usable scores in {max_attempts} attempts; last: "
        f"{type(failure).__name__}: {failure}. Raise max_attempts or request_timeout, use a stronger judge, or pass "
        "swallow_exceptions=True to skip such groups"
    ) from failure


def _rescored(trajectory: Trajectory, score: TrajectoryScore) -> Trajectory:
    """A copy of ``trajectory`` whose reward is the judge's score (the old one kept as a metric)."""
    copy = trajectory.model_copy(update={"metrics": dict(trajectory.metrics), "logs": list(trajectory.logs)})
    copy.metrics["independent_reward"] = trajectory.reward
    copy.metrics["ruler_score"] = score.score
    copy.reward = score.score
    copy.log(f"RULER explanation: {score.explanation}")
    return copy


async def ruler_score_group(
    group: TrajectoryGroup,
    judge_model: str = DEFAULT_JUDGE_MODEL,
    extra_litellm_params: dict[str, Any] | None = None,
    rubric: str = DEFAULT_RUBRIC,
    *,
    client: AsyncOpenAI | None = None,
    swallow_exceptions: bool = False,
    structured_output: bool = True,
    max_attempts: int = 3,
    request_timeout: float = 300.0,
    cache_dir: str | os.PathLike[str] | None = None,
    stats: RulerStats | None = None,
    debug: bool = False,
) -> TrajectoryGroup | None:
    """A copy of ``group`` rewarded by the judge: ``reward`` = its score, ``metrics["ruler_score"]`` too, the
    old reward in ``metrics["independent_reward"]`` and the judge's explanation in ``logs``.

    Fits ``gather_trajectory_groups(..., after_each=lambda g: ruler_score_group(g, "o4-mini", client=judge))``.
    With ``swallow_exceptions=True`` a group the judge fails on is skipped (None) and counted in
    ``stats.skipped_groups``. See ``ruler`` for the other options.
    """
    for index, trajectory in enumerate(group.trajectories):
        if trajectory.additional_histories:
            raise ValueError(
                f"trajectory {index} has additional_histories, which RULER does not judge; score such groups "
                "with your own reward, or move the extra conversation into messages_and_choices"
            )
    stats = ruler_stats if stats is None else stats
    try:
        scores = await ruler(
            [trajectory.messages() for trajectory in group.trajectories],
            judge_model,
            extra_litellm_params,
            rubric,
            client=client,
            structured_output=structured_output,
            max_attempts=max_attempts,
            request_timeout=request_timeout,
            cache_dir=cache_dir,
            stats=stats,
            debug=debug,
        )
    except Exception as error:
        if not swallow_exceptions:
            raise
        stats.skipped_groups += 1
        stats.last_error = f"{type(error).__name__}: {error}"
        logger.warning(
            "RULER skipped a group (%d skipped so far): %s", stats.skipped_groups, stats.last_error
        )
        return None
    stats.judged_groups += 1
    return TrajectoryGroup(
        [_rescored(trajectory, score) for trajectory, score in zip(group.trajectories, scores, strict=True)],
        exceptions=group.exceptions,
        metadata=dict(group.metadata),
        metrics=dict(group.metrics),
        logs=list(group.logs),
    )

"""Trajectories: what a rollout produces and what training consumes.

A trajectory's ``messages_and_choices`` mixes plain OpenAI message dicts with OpenAI ``Choice`` objects; a
``Choice`` (with logprobs) marks the tokens that get trained, exactly as they were sampled. Unlike ART, a JSON
round trip keeps that marker: a serialized ``Choice`` comes back as a ``Choice``.

``openai`` is imported lazily: a value can only be a ``Choice`` once ``openai`` has been imported, so the core
package stays cheap to import.
"""

from __future__ import annotations

import asyncio
import math
import sys
import traceback
from collections.abc import Awaitable, Generator, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, TypeGuard, cast

import pydantic
from pydantic import PlainSerializer, PlainValidator, SerializationInfo

from art_core.gather_context import bounded, current_gather_context

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
    from openai.types.chat.chat_completion import Choice

_CHOICE_MODULE = "openai.types.chat.chat_completion"

MetadataValue: TypeAlias = float | int | str | bool | None
MetricValue: TypeAlias = float | int | bool


def choice_class() -> type[Choice]:
    """The OpenAI ``Choice`` class (imports openai on first use)."""
    from openai.types.chat.chat_completion import Choice

    return Choice


def is_choice(value: object) -> TypeGuard[Choice]:
    """True when ``value`` is an OpenAI ``Choice`` (without importing openai when it was never loaded)."""
    module = sys.modules.get(_CHOICE_MODULE)
    return module is not None and isinstance(value, module.Choice)


def _looks_like_serialized_choice(value: dict[str, Any]) -> bool:
    return "message" in value and "finish_reason" in value and "role" not in value


def _validate_message_or_choice(value: Any) -> Any:
    if is_choice(value):
        return value
    if isinstance(value, dict):
        if _looks_like_serialized_choice(value):
            return choice_class().model_validate(value)
        if "role" not in value:
            raise ValueError(
                f"message {str(value)[:80]!r} has no 'role'; messages are OpenAI chat message dicts "
                "such as {'role': 'user', 'content': '...'}"
            )
        return value
    if isinstance(value, pydantic.BaseModel) and hasattr(value, "role"):
        # e.g. a ChatCompletionMessage appended by hand: keep it as a plain (untrained) message
        return value.model_dump(mode="json", exclude_none=True)
    raise ValueError(
        f"messages_and_choices holds a {type(value).__name__}; expected an OpenAI message dict or an "
        "openai Choice (from client.chat.completions.create(...).choices[0])"
    )


def _serialize_message_or_choice(value: Any, info: SerializationInfo) -> Any:
    if is_choice(value):
        return value.model_dump(mode=info.mode)
    return value


def _validate_messages(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise ValueError(
            f"messages_and_choices must be a list of messages and Choices, not {type(value).__name__}"
        )
    return [_validate_message_or_choice(item) for item in value]


def _serialize_messages(value: list[Any], info: SerializationInfo) -> list[Any]:
    return [_serialize_message_or_choice(item, info) for item in value]


if TYPE_CHECKING:
    Message: TypeAlias = ChatCompletionMessageParam
    MessageOrChoice: TypeAlias = ChatCompletionMessageParam | Choice
    MessagesAndChoices: TypeAlias = list[MessageOrChoice]
    Tools: TypeAlias = list[ChatCompletionToolParam]
else:
    Message = dict[str, Any]
    MessageOrChoice = Any
    MessagesAndChoices = Annotated[
        list[Any],
        PlainValidator(_validate_messages),
        PlainSerializer(_serialize_messages),
    ]
    Tools = list[dict[str, Any]]


def _check_reward(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"reward is {value}; rewards must be finite numbers")
    return value


class PydanticException(pydantic.BaseModel):
    """An exception raised by a rollout, kept as data so a group can be logged and serialized."""

    type: str
    message: str
    traceback: str

    @classmethod
    def from_exception(cls, exception: BaseException) -> PydanticException:
        return cls(
            type=f"{type(exception).__module__}.{type(exception).__qualname__}",
            message=str(exception),
            traceback="".join(
                traceback.format_exception(type(exception), exception, exception.__traceback__)
            ),
        )


class History(pydantic.BaseModel):
    """An extra conversation of a trajectory (e.g. a sub-agent's), trained with the trajectory's advantage."""

    messages_and_choices: MessagesAndChoices
    tools: Tools | None = None

    def messages(self) -> list[Message]:
        return get_messages(self.messages_and_choices)


class Trajectory(pydantic.BaseModel):
    """One rollout: the conversation, the tools offered, and the reward it earned."""

    messages_and_choices: MessagesAndChoices = pydantic.Field(default_factory=list)
    tools: Tools | None = None
    additional_histories: list[History] = pydantic.Field(default_factory=list)
    reward: float = 0.0
    initial_policy_version: int | None = None
    final_policy_version: int | None = None
    metrics: dict[str, MetricValue] = pydantic.Field(default_factory=dict)
    metadata: dict[str, MetadataValue] = pydantic.Field(default_factory=dict)
    logs: list[str] = pydantic.Field(default_factory=list)
    start_time: datetime = pydantic.Field(default_factory=datetime.now, exclude=True)

    @pydantic.field_validator("reward")
    @classmethod
    def _reward_is_finite(cls, value: float) -> float:
        return _check_reward(value)

    def log(self, message: str) -> None:
        self.logs.append(message)

    def finish(self) -> Trajectory:
        """Record the rollout's duration in ``metrics['duration']`` and return self."""
        self.metrics["duration"] = (datetime.now() - self.start_time).total_seconds()
        return self

    def messages(self) -> list[Message]:
        return get_messages(self.messages_and_choices)

    def choices(self) -> list[Choice]:
        """The trainable ``Choice`` objects of the main history, in order."""
        return [item for item in self.messages_and_choices if is_choice(item)]

    def __str__(self) -> str:
        return f"Trajectory(reward={self.reward}, metrics={self.metrics}, metadata={self.metadata})"


def get_messages(messages_and_choices: Iterable[Any]) -> list[Message]:
    """Plain message dicts, with each ``Choice`` turned into the assistant message it produced."""
    messages: list[Message] = []
    for item in messages_and_choices:
        if is_choice(item):
            message: dict[str, Any] = {"role": "assistant", "content": item.message.content or ""}
            if item.message.tool_calls:
                message["tool_calls"] = [call.model_dump(mode="json") for call in item.message.tool_calls]
            messages.append(cast("Message", message))
        else:
            messages.append(cast("Message", item))
    return messages


class TrajectoryGroup(pydantic.BaseModel):
    """Trajectories of one scenario whose rewards are compared with each other (GRPO's group).

    ``TrajectoryGroup(rollout() for _ in range(8))`` over awaitables starts empty and is awaitable: awaiting it
    runs the rollouts concurrently, keeps failures as ``exceptions``, feeds the progress bar of
    ``gather_trajectory_groups`` and returns the group itself, filled in. Awaiting a finished group returns it.
    """

    trajectories: list[Trajectory]
    exceptions: list[PydanticException] = pydantic.Field(default_factory=list)
    metadata: dict[str, MetadataValue] = pydantic.Field(default_factory=dict)
    metrics: dict[str, MetricValue] = pydantic.Field(default_factory=dict)
    logs: list[str] = pydantic.Field(default_factory=list)

    _pending: list[Awaitable[Trajectory]] | None = pydantic.PrivateAttr(default=None)

    def __init__(
        self,
        trajectories: Iterable[Trajectory | BaseException] | Iterable[Awaitable[Trajectory]] = (),
        *,
        exceptions: Iterable[BaseException | PydanticException | dict[str, Any]] = (),
        metadata: dict[str, MetadataValue] | None = None,
        metrics: dict[str, MetricValue] | None = None,
        logs: list[str] | None = None,
    ) -> None:
        items: list[Any] = list(trajectories)
        pending = [item for item in items if _is_awaitable(item)]
        if pending and len(pending) != len(items):
            raise TypeError("a TrajectoryGroup takes either finished trajectories or awaitables, not a mix")
        failures = [item for item in items if isinstance(item, BaseException)] + list(exceptions)
        super().__init__(
            trajectories=[] if pending else [item for item in items if not isinstance(item, BaseException)],
            # pydantic also calls this __init__ when validating JSON, so dicts pass through to validation
            exceptions=[
                PydanticException.from_exception(item) if isinstance(item, BaseException) else item
                for item in failures
            ],
            metadata=metadata or {},
            metrics=metrics or {},
            logs=logs or [],
        )
        self._pending = pending or None

    @property
    def pending(self) -> int:
        """How many rollouts have not been awaited yet (0 for a finished group)."""
        return len(self._pending) if self._pending else 0

    def __await__(self) -> Generator[Any, None, TrajectoryGroup]:
        return self._finish().__await__()

    async def _finish(self) -> TrajectoryGroup:
        if not self._pending:
            return self
        awaitables, self._pending = self._pending, None
        context = current_gather_context()
        futures = [asyncio.ensure_future(bounded(a, context.rollout_timeout_s)) for a in awaitables]
        try:
            for future in asyncio.as_completed(futures):
                try:
                    trajectory = await future
                except Exception as error:  # a failed rollout is data, unless there are too many
                    self.exceptions.append(PydanticException.from_exception(error))
                    context.record_exception(error)
                    continue
                if not isinstance(trajectory, Trajectory):
                    raise TypeError(
                        f"a rollout returned {type(trajectory).__name__}; rollouts must return art.Trajectory"
                    )
                self.trajectories.append(trajectory)
                context.record_trajectory(trajectory)
        finally:
            for future in futures:
                future.cancel()
        return self

    def log(self, message: str) -> None:
        self.logs.append(message)

    def __iter__(self) -> Iterator[Trajectory]:  # type: ignore[override]
        return iter(self.trajectories)

    def __len__(self) -> int:
        return len(self.trajectories)


def _is_awaitable(value: object) -> bool:
    return hasattr(value, "__await__")


def check_rewards(groups: Iterable[TrajectoryGroup]) -> None:
    """Raise ``ValueError`` naming the group and trajectory index of the first non-finite reward."""
    for group_index, group in enumerate(groups):
        for trajectory_index, trajectory in enumerate(group.trajectories):
            if not math.isfinite(trajectory.reward):
                raise ValueError(
                    f"reward of trajectory {trajectory_index} in group {group_index} is {trajectory.reward}; "
                    "rewards must be finite"
                )


def check_groups(
    value: object, *, what: str = "trajectory_groups", allow_empty: bool = False
) -> list[TrajectoryGroup]:
    """Validate a caller's groups: a list of ``TrajectoryGroup`` with finite rewards.

    For training (the default) an empty list, or a group with neither trajectories nor recorded failures, is a
    ``ValueError``; a group whose rollouts all failed is kept (it trains nothing and is counted). Logging passes
    ``allow_empty=True``.
    """
    if isinstance(value, TrajectoryGroup):
        raise TypeError(
            f"{what} must be a list of TrajectoryGroup, not a single TrajectoryGroup; wrap it in [...]"
        )
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be an iterable of TrajectoryGroup, not {type(value).__name__}")
    groups = list(value)
    for index, group in enumerate(groups):
        if not isinstance(group, TrajectoryGroup):
            raise TypeError(f"{what}[{index}] is a {type(group).__name__}; expected TrajectoryGroup")
        if group.pending:
            raise TypeError(
                f"{what}[{index}] has {group.pending} rollouts not awaited; await the group first"
            )
        if not allow_empty and not group.trajectories and not group.exceptions:
            raise ValueError(
                f"group {index} of {what} has no trajectories; drop it or fill it before training"
            )
    if not allow_empty and not groups:
        raise ValueError(f"{what} is empty; pass at least one TrajectoryGroup")
    check_rewards(groups)
    return groups

"""Supervised fine-tuning: the ``SFTBackend`` contract, its common options, and what every backend shares.

``await backend.train_sft(model, trajectories, ...)`` trains on the assistant turns of ordinary
``Trajectory`` objects (message dicts or ``Choice``s; logprobs are not needed). One call is one step of the
model, exactly like one ``train()`` call: it writes one checkpoint, served as ``name@step``, that RL resumes from.
Inside the call the examples are shuffled (``shuffle_seed``), cut into batches of ``batch_size`` and each batch
takes one optimizer step at the schedule's learning rate, for ``epochs`` passes. Everything here is pure data
(no torch), so every backend plans the same batches and learning rates.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, get_args, runtime_checkable

from art_core.backend import Backend
from art_core.results import TrainResult
from art_core.trajectories import Trajectory, is_choice

if TYPE_CHECKING:
    from openai.types.chat.chat_completion import Choice

    from art_core.model import TrainableModel

AssistantTurns: TypeAlias = Literal["all", "last"]
LearningRateSchedule: TypeAlias = Literal["cosine", "constant"]

# The defaults of the options every SFTBackend shares; the conformance kit checks each backend keeps them.
COMMON_SFT_DEFAULTS: dict[str, object] = {
    "learning_rate": 1e-4,
    "epochs": 1,
    "batch_size": 8,
    "assistant_turns": "all",
    "schedule": "cosine",
    "warmup_ratio": 0.0,
    "shuffle_seed": 0,
}


@runtime_checkable
class SFTBackend(Backend, Protocol):
    """A backend that fine-tunes on demonstrations: ``train_sft()`` takes at least these options, no ``**kwargs``."""

    async def train_sft(
        self,
        model: TrainableModel,
        trajectories: Iterable[Trajectory],
        /,
        *,
        learning_rate: float = 1e-4,
        epochs: int = 1,
        batch_size: int = 8,
        assistant_turns: AssistantTurns = "all",
        schedule: LearningRateSchedule = "cosine",
        warmup_ratio: float = 0.0,
        shuffle_seed: int | None = 0,
    ) -> TrainResult: ...


@dataclass(frozen=True)
class SFTOptions:
    """The common ``train_sft()`` options, checked: each bad value is a ValueError naming it and the fix.

    ``learning_rate`` is the peak; ``schedule="cosine"`` decays it to 0 over the call after a linear warmup of
    ``warmup_ratio`` of the optimizer steps; ``"constant"`` keeps it after the warmup. ``assistant_turns="last"``
    trains only the last assistant turn of each conversation (the others are context). ``shuffle_seed=None``
    keeps the given order.
    """

    learning_rate: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    assistant_turns: AssistantTurns = "all"
    schedule: LearningRateSchedule = "cosine"
    warmup_ratio: float = 0.0
    shuffle_seed: int | None = 0

    def __post_init__(self) -> None:
        _check_number("learning_rate", self.learning_rate, "a finite number >= 0")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a finite number >= 0")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        _check_choice("assistant_turns", self.assistant_turns, get_args(AssistantTurns))
        _check_choice("schedule", self.schedule, get_args(LearningRateSchedule))
        _check_number("warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(
                f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1) (a fraction of the steps)"
            )
        seed = self.shuffle_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"shuffle_seed={seed!r} must be an int, or None to keep the given order")

    def plan(self, num_examples: int) -> list[tuple[int, ...]]:
        """The example indices of each optimizer step: every epoch shuffled, cut into ``batch_size`` batches.

        The last batch of an epoch may be smaller; batches never span epochs.
        """
        if num_examples < 1:
            raise ValueError("train_sft() got no trajectories; pass at least one with an assistant turn")
        batches: list[tuple[int, ...]] = []
        for epoch in range(self.epochs):
            order = list(range(num_examples))
            if self.shuffle_seed is not None:
                random.Random(self.shuffle_seed * 1_000_003 + epoch).shuffle(order)
            batches += [
                tuple(order[i : i + self.batch_size]) for i in range(0, num_examples, self.batch_size)
            ]
        return batches

    def learning_rate_at(self, index: int, total: int) -> float:
        """The learning rate of optimizer step ``index`` (0-based) of ``total``."""
        warmup = math.ceil(self.warmup_ratio * total)
        if index < warmup:
            return self.learning_rate * (index + 1) / (warmup + 1)
        if self.schedule == "constant":
            return self.learning_rate
        progress = (index - warmup) / max(total - warmup, 1)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_number(name: str, value: object, need: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be {need}, not a {type(value).__name__}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; use one of {', '.join(repr(a) for a in allowed)}")


def _is_assistant(item: Any) -> bool:
    return is_choice(item) or (isinstance(item, dict) and item.get("role") == "assistant")


def _as_target(item: Any) -> Choice:
    """An assistant turn as a ``Choice`` without logprobs: the trainers tokenize it from its text."""
    from openai.types.chat.chat_completion import Choice

    if is_choice(item):
        message = item.message.model_dump(mode="json", exclude_none=True)
    else:
        message = {key: value for key, value in item.items() if key != "weight"}
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: the text ones are the answer
            message["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    message["role"] = "assistant"
    reason = "tool_calls" if message.get("tool_calls") else "stop"
    return Choice.model_validate({"index": 0, "finish_reason": reason, "message": message, "logprobs": None})


def _as_context(item: Any) -> Any:
    if is_choice(item):
        return item.message.model_dump(mode="json", exclude_none=True)
    return {key: value for key, value in item.items() if key != "weight"} if isinstance(item, dict) else item


def sft_history(items: Sequence[Any], assistant_turns: AssistantTurns) -> list[Any]:
    """One conversation with its target turns as ``Choice``s (no logprobs) and everything else as message dicts.

    Targets: every assistant turn (``"all"``) or the last one (``"last"``); an assistant message dict with
    ``"weight": 0`` (OpenAI's fine-tuning format) is context either way.
    """
    candidates = [
        index
        for index, item in enumerate(items)
        if _is_assistant(item) and not (isinstance(item, dict) and item.get("weight", 1) == 0)
    ]
    targets = set(candidates if assistant_turns == "all" else candidates[-1:])
    return [_as_target(item) if index in targets else _as_context(item) for index, item in enumerate(items)]


def sft_conversations(
    trajectories: Iterable[Trajectory], assistant_turns: AssistantTurns
) -> list[tuple[list[Any], list[Any] | None]]:
    """Every trainable conversation (main and additional histories) of ``trajectories``, with its tools.

    Raises ValueError naming the first trajectory that has no assistant turn to train on.
    """
    conversations: list[tuple[list[Any], list[Any] | None]] = []
    for index, trajectory in enumerate(trajectories):
        if not isinstance(trajectory, Trajectory):
            raise TypeError(
                f"trajectory {index} is a {type(trajectory).__name__}; train_sft() takes art.Trajectory objects "
                "(art_core.sft_data.read_sft_jsonl reads them from OpenAI fine-tuning JSONL)"
            )
        histories = [(trajectory.messages_and_choices, trajectory.tools)] + [
            (history.messages_and_choices, history.tools) for history in trajectory.additional_histories
        ]
        found = [
            (sft_history(items, assistant_turns), tools)
            for items, tools in histories
            if any(_is_assistant(item) for item in items)
        ]
        found = [(items, tools) for items, tools in found if any(is_choice(item) for item in items)]
        if not found:
            raise ValueError(
                f"trajectory {index} has no assistant turn to train on (or all have weight 0); every SFT example "
                "needs at least one assistant message or Choice"
            )
        conversations += [(items, None if tools is None else list(tools)) for items, tools in found]
    return conversations


def sft_result_metrics(
    losses: Sequence[tuple[float, int]], examples: int, learning_rate: float
) -> dict[str, float]:
    """The metrics of a call from each optimizer step's (mean loss, trained tokens), for ``model.log``.

    ``loss/sft`` is the token-weighted mean over the call; ``_first``/``_last`` are its first and last batch's.
    """
    tokens = sum(count for _, count in losses)
    mean = sum(loss * count for loss, count in losses) / max(tokens, 1)
    return {
        "loss/sft": mean,
        "loss/sft_first_batch": losses[0][0] if losses else math.nan,
        "loss/sft_last_batch": losses[-1][0] if losses else math.nan,
        "loss/learning_rate": learning_rate,
        "data/sft_examples": float(examples),
        "data/sft_trained_tokens": float(tokens),
        "data/step_num_gradient_steps": float(len(losses)),
    }


__all__ = [
    "COMMON_SFT_DEFAULTS",
    "AssistantTurns",
    "LearningRateSchedule",
    "SFTBackend",
    "SFTOptions",
    "sft_conversations",
    "sft_history",
    "sft_result_metrics",
]

"""Trajectory groups for the tests: real Choices with logprobs, as a rollout through the chat endpoint gives."""

from __future__ import annotations

from typing import Any

from openai.types.chat import ChatCompletionMessage, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs

from art_core.model import TrainableModel
from art_core.trajectories import Trajectory, TrajectoryGroup


def choice(text: str, token_ids: list[int]) -> Choice:
    logprobs = [
        ChatCompletionTokenLogprob(token=f"token_id:{t}", logprob=-0.5, bytes=None, top_logprobs=[])
        for t in token_ids
    ]
    return Choice(
        index=0,
        finish_reason="stop",
        message=ChatCompletionMessage(role="assistant", content=text),
        logprobs=ChoiceLogprobs(content=logprobs),
    )


def groups(rewards: list[list[float]], **metadata: Any) -> list[TrajectoryGroup]:
    """One group per reward list; each trajectory is a user prompt and a sampled Choice."""
    return [
        TrajectoryGroup(
            [
                Trajectory(
                    messages_and_choices=[
                        {"role": "user", "content": f"q{g}"},
                        choice(f"a{g}{i}", [3 + i, 7]),
                    ],
                    reward=reward,
                )
                for i, reward in enumerate(group_rewards)
            ],
            metadata=dict(metadata),
        )
        for g, group_rewards in enumerate(rewards)
    ]


def model(tmp_path: Any, name: str = "agent-001", **kwargs: Any) -> TrainableModel:
    return TrainableModel(
        name=name,
        project="proj",
        base_model="toy-base",
        base_path=str(tmp_path / "client"),
        report_metrics=[],
        **kwargs,
    )

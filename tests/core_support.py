"""Helpers for art-core tests: choices as our servers return them, and a small in-memory backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openai.types.chat.chat_completion import Choice

import art_core as art


def make_choice(text: str = "acd", token_ids: tuple[int, ...] = (5, 6, 7), logprob: float = -0.5) -> Choice:
    """A Choice shaped like our servers' responses: logprob tokens are "token_id:<id>"."""
    return Choice.model_validate(
        {
            "finish_reason": "stop",
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": {
                "content": [
                    {"token": f"token_id:{t}", "logprob": logprob, "bytes": None, "top_logprobs": []}
                    for t in token_ids
                ]
            },
        }
    )


def make_trajectory(reward: float, text: str = "acd", **metrics: float) -> art.Trajectory:
    return art.Trajectory(
        messages_and_choices=[
            {"role": "system", "content": "Sort the letters."},
            {"role": "user", "content": "Sort these letters: d a c"},
            make_choice(text),
        ],
        reward=reward,
        metrics=metrics,
    )


def make_groups(rewards: list[list[float]]) -> list[art.TrajectoryGroup]:
    return [art.TrajectoryGroup([make_trajectory(r) for r in group]) for group in rewards]


class MemoryBackend:
    """A minimal real backend for core tests: steps in memory, checkpoint deletions recorded."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}
        self.kept: dict[str, list[int]] = {}
        self.checkpoints: dict[str, set[int]] = {}
        self.registered: list[str] = []

    async def register(self, model: art.Model) -> None:
        self.registered.append(model.name)
        self.steps.setdefault(model.name, 0)
        self.checkpoints.setdefault(model.name, {0})

    async def close(self) -> None:
        return None

    async def _get_step(self, model: art.TrainableModel) -> int:
        return self.steps[model.name]

    async def _delete_checkpoint_files(self, model: art.TrainableModel, steps_to_keep: list[int]) -> None:
        self.kept[model.name] = list(steps_to_keep)
        self.checkpoints[model.name] &= set(steps_to_keep)

    def _model_inference_name(self, model: art.Model, step: int | None = None) -> str:
        return model.name if step is None else f"{model.name}@{step}"

    async def _prepare_backend_for_training(self, model: art.TrainableModel) -> tuple[str, str]:
        return "http://127.0.0.1:9/v1", "test-key"

    def advance(self, model: art.Model, to: int) -> None:
        self.steps[model.name] = to
        self.checkpoints[model.name].add(to)


def model_dir(model: art.Model) -> Path:
    return model.output_dir()


def read_lines(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]

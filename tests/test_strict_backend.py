"""StrictBackend runs the conformance kit, validates hard, and really learns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import art_core as art
from art_core.testing import BackendConformance, StrictBackend, StrictStorage
from art_core.testing.strict import LETTERS


class TestStrictBackendConformance(BackendConformance):
    learning_rate = 0.5

    @pytest.fixture
    def storage(self) -> StrictStorage:
        return StrictStorage()

    @pytest.fixture
    def backend(self, storage: StrictStorage) -> StrictBackend:
        return StrictBackend(storage)

    @pytest.fixture
    def base_model(self) -> str:
        return "strict-letters"

    @pytest.fixture
    def fresh_backend(self, storage: StrictStorage) -> Callable[[], Any]:
        return lambda: StrictBackend(storage)


async def test_strict_backend_learns_to_say_a() -> None:
    backend = StrictBackend()
    model = art.TrainableModel(name="learner", project="p", base_model="strict-letters", report_metrics=[])
    await model.register(backend)
    client = model.openai_client()

    async def rollout(seed: int) -> art.Trajectory:
        messages: list[Any] = [{"role": "user", "content": "say a"}]
        completion = await client.chat.completions.create(
            model=model.get_inference_name(), messages=messages, max_tokens=4, logprobs=True, seed=seed
        )
        text = completion.choices[0].message.content or ""
        reward = text.count("a") / max(len(text), 1)
        return art.Trajectory(messages_and_choices=[*messages, completion.choices[0]], reward=reward)

    async def mean_reward(step_seed: int) -> float:
        groups = await art.gather_trajectory_groups(
            [art.TrajectoryGroup(rollout(step_seed * 100 + i) for i in range(8)) for _ in range(4)],
            pbar_desc=None,
        )
        return sum(t.reward for g in groups for t in g) / 32

    before = await mean_reward(0)
    for step in range(15):
        groups = await art.gather_trajectory_groups(
            [art.TrajectoryGroup(rollout(step * 1000 + g * 10 + i) for i in range(8)) for g in range(4)],
            pbar_desc=None,
        )
        await backend.train(model, groups, learning_rate=2.0)
    after = await mean_reward(99)
    await backend.close()
    assert before < 0.15 and after > before + 0.3, (before, after)
    assert LETTERS[0] == "a"


async def test_strict_backend_refuses_bad_options_and_inputs() -> None:
    backend = StrictBackend()
    model = art.TrainableModel(name="m", project="p", base_model="strict-letters")
    other = art.TrainableModel(name="other", project="p", base_model="strict-letters")
    await backend.register(model)
    with pytest.raises(
        ValueError, match="learning_rate=nan is invalid: learning_rate must be a finite number"
    ):
        await backend.train(model, [], learning_rate=float("nan"))
    with pytest.raises(ValueError, match="importance_sampling_level"):
        await backend.train(model, [], importance_sampling_level="tokens")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ppo must be True or False"):
        await backend.train(model, [], ppo=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not registered"):
        await backend.train(other, [])
    no_logprobs = art.TrajectoryGroup(
        [
            art.Trajectory(messages_and_choices=[{"role": "user", "content": "x"}], reward=r)
            for r in (0.0, 1.0)
        ]
    )
    with pytest.raises(ValueError, match="no Choice to train"):
        await backend.train(model, [no_logprobs])
    with pytest.raises(ValueError, match="only trains base_model"):
        await backend.register(art.TrainableModel(name="q", project="p", base_model="Qwen/Qwen3-0.6B"))

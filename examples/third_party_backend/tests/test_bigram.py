"""BigramBackend's own behaviour: it learns, its own option has its effect, bad input changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import art_core as art
import pytest

from art_bigram import BigramBackend
from art_bigram.backend import checkpoint_dir
from art_bigram.storage import load


async def rollouts(model: art.TrainableModel, seed: int, groups: int = 4) -> list[art.TrajectoryGroup]:
    """Groups of 8 answers to "write letters in alphabetical order", rewarded by their share of ascending pairs."""
    client = model.openai_client()

    async def rollout(index: int) -> art.Trajectory:
        messages: list[Any] = [{"role": "user", "content": "write letters in alphabetical order"}]
        completion = await client.chat.completions.create(
            model=model.get_inference_name(),
            messages=messages,
            max_tokens=4,
            logprobs=True,
            seed=seed + index,
        )
        letters = (completion.choices[0].message.content or "").replace(" ", "")
        pairs = list(zip(letters, letters[1:], strict=False))
        reward = sum(b > a for a, b in pairs) / len(pairs) if pairs else 0.0
        return art.Trajectory(messages_and_choices=[*messages, completion.choices[0]], reward=reward)

    return await art.gather_trajectory_groups(
        [art.TrajectoryGroup(rollout(g * 8 + i) for i in range(8)) for g in range(groups)], pbar_desc=None
    )


def mean_reward(groups: list[art.TrajectoryGroup]) -> float:
    rewards = [t.reward for group in groups for t in group.trajectories]
    return sum(rewards) / len(rewards)


def new_model(tmp_path: Path, name: str = "agent") -> art.TrainableModel:
    return art.TrainableModel(
        name=name, project="p", base_model="bigram-letters", base_path=str(tmp_path), report_metrics=[]
    )


def test_rewards_rise_and_the_loop_logs(tmp_path: Path) -> None:
    async def main() -> tuple[float, float]:
        backend = BigramBackend()
        model = new_model(tmp_path)
        await model.register(backend)
        try:
            before = mean_reward(await rollouts(model, seed=10_000))
            for step in range(8):
                groups = await rollouts(model, seed=step * 100)
                result = await backend.train(
                    model, groups, learning_rate=50.0
                )  # a table of logits takes big steps
                await model.log(groups, metrics=result.metrics, step=result.step)
            return before, mean_reward(await rollouts(model, seed=20_000))
        finally:
            await backend.close()

    before, after = asyncio.run(main())
    assert after > before + 0.3, (before, after)
    assert len(new_model(tmp_path).read_history()) == 8


def test_max_grad_norm_caps_the_update_and_verbose_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def step(max_grad_norm: float | None, name: str) -> tuple[float, float]:
        backend = BigramBackend()
        model = new_model(tmp_path, name)
        await model.register(backend)
        try:
            groups = await rollouts(model, seed=1, groups=2)
            result = await backend.train(
                model, groups, learning_rate=1.0, max_grad_norm=max_grad_norm, verbose=True
            )
        finally:
            await backend.close()
        before, after = load(checkpoint_dir(model), 0), load(checkpoint_dir(model), 1)
        moved = (
            sum(
                (a - b) ** 2
                for row_a, row_b in zip(after, before, strict=True)
                for a, b in zip(row_a, row_b, strict=True)
            )
            ** 0.5
        )
        return moved, result.metrics["loss/grad_norm"]

    free_move, grad_norm = asyncio.run(step(None, "free"))
    capped_move, _ = asyncio.run(step(1e-3, "capped"))
    assert free_move == pytest.approx(grad_norm) and grad_norm > 1e-2
    assert capped_move == pytest.approx(1e-3)
    assert "[art_bigram] free step 1: loss=" in capsys.readouterr().err


def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        backend = BigramBackend()
        model = new_model(tmp_path)
        await model.register(backend)
        try:
            groups = await rollouts(model, seed=1, groups=1)
            with pytest.raises(
                ValueError,
                match="learning_rate=-1.0 is invalid: learning_rate must be a finite number and > 0",
            ):
                await backend.train(model, groups, learning_rate=-1.0)
            with pytest.raises(ValueError, match="importance_sampling_level='tokens'"):
                await backend.train(model, groups, importance_sampling_level="tokens")  # type: ignore[arg-type]
            plain = art.TrajectoryGroup(
                art.Trajectory(messages_and_choices=[{"role": "user", "content": "x"}], reward=r)
                for r in (0.0, 1.0)
            )
            with pytest.raises(ValueError, match="trajectory 0 in group 0 has no Choice to train"):
                await backend.train(model, [await plain])
            with pytest.raises(ValueError, match="trains base_model='bigram-letters' only"):
                await backend.register(
                    art.TrainableModel(name="q", project="p", base_model="Qwen/Qwen3-0.6B")
                )
            assert await model.get_step() == 0
        finally:
            await backend.close()

    asyncio.run(main())


def test_the_entry_point_registers_the_backend() -> None:
    """Installed, the package is discovered through the `art` entry-point group like any shipped backend."""
    entries = {entry.name: entry for entry in art.list_backends()}
    assert entries["bigram"].obj is BigramBackend and entries["bigram"].distribution == "art-bigram"
    assert isinstance(art.load_backend("bigram"), BigramBackend)

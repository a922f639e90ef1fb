"""RULER end to end against our own inference server: LocalBackend serves a judge (the tiny model, taught by
a short SFT to answer this judge prompt) and ruler_score_group reads its sampled answer; the raw tiny model's
garbage is retried and then skipped and counted; the server's refusal of response_format is explained."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import art_core as art
from art_core.rewards import RulerError, RulerStats, ruler_score_group
from art_core.rewards.prompt import judge_messages
from art_local.backend import LocalBackend
from art_local.demo.warm_start import SftExample, WarmStartConfig, sft_warm_start
from art_local.training import TrainerConfig

SYSTEM = {"role": "system", "content": "Answer with the capital city."}
USER = {"role": "user", "content": "What is the capital of France?"}
RUBRIC = "- The right city wins."
ANSWER = json.dumps(
    {
        "scores": [
            {"trajectory_id": "1", "explanation": "right city", "score": 1.0},
            {"trajectory_id": "2", "explanation": "wrong city", "score": 0.0},
        ]
    }
)
JUDGE_RECIPE = WarmStartConfig(steps=80, batch_size=1, learning_rate=1e-2)  # ~30 s once, then cached
SAMPLING = {"temperature": 0.0, "max_tokens": 120}


def group() -> art.TrajectoryGroup:
    return art.TrajectoryGroup(
        art.Trajectory(
            messages_and_choices=[SYSTEM, USER, {"role": "assistant", "content": city}], reward=0.5
        )
        for city in ("Paris", "Lyon")
    )


@pytest.fixture(scope="module")
def judge_model_dir(tiny_model_dir: Path) -> Path:
    """The tiny model after a short SFT on this judge request -> ANSWER (cached beside the tiny model)."""
    messages, _ = judge_messages([t.messages() for t in group().trajectories], RUBRIC)
    digest = hashlib.sha256(json.dumps([messages, ANSWER]).encode()).hexdigest()[:10]

    def example(rng: random.Random, tokenizer: Any) -> SftExample:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        answer = [*tokenizer.encode(ANSWER, add_special_tokens=False), tokenizer.eos_token_id]
        return (*prompt, *answer), (False,) * len(prompt) + (True,) * len(answer)

    return sft_warm_start(
        tiny_model_dir,
        example,
        JUDGE_RECIPE,
        name=f"rulerjudge-{digest}",
        label="RULER judge",
        progress=False,
    )


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(str(tmp_path / "art"), device="cpu", trainer_config=TrainerConfig(lora_rank=None))
    yield local
    await local.close()


async def served(backend: LocalBackend, name: str, base_model: Path) -> art.TrainableModel:
    model = art.TrainableModel(name=name, project="judges", base_model=str(base_model))
    await model.register(backend)
    return model


async def test_a_locally_served_judge_scores_a_group(backend: LocalBackend, judge_model_dir: Path) -> None:
    judge = await served(backend, "judge", judge_model_dir)
    stats = RulerStats()
    groups = await art.gather_trajectory_groups(
        [group()],
        after_each=lambda g: ruler_score_group(
            g,
            judge.get_inference_name(),
            SAMPLING,
            RUBRIC,
            client=judge.openai_client(),
            structured_output=False,  # our server samples freely; the answer is still parsed strictly
            stats=stats,
        ),
        pbar_desc=None,
    )
    (scored,) = groups
    assert [t.reward for t in scored.trajectories] == [1.0, 0.0]
    assert scored.trajectories[0].metrics == {"independent_reward": 0.5, "ruler_score": 1.0}
    assert scored.trajectories[1].logs == ["RULER explanation: wrong city"]
    assert (stats.requests, stats.judged_groups) == (1, 1)


async def test_an_untrained_judge_is_retried_then_skipped_and_a_refusal_is_explained(
    backend: LocalBackend, tiny_model_dir: Path
) -> None:
    judge = await served(backend, "raw", tiny_model_dir)
    client = judge.openai_client()
    stats = RulerStats()
    options: dict[str, Any] = {
        "client": client,
        "structured_output": False,
        "max_attempts": 2,
        "stats": stats,
    }
    skipped = await ruler_score_group(group(), "raw", SAMPLING, RUBRIC, swallow_exceptions=True, **options)
    assert skipped is None and (stats.requests, stats.retries, stats.skipped_groups) == (2, 1, 1)
    with pytest.raises(RulerError, match=r"judge 'raw' gave no usable scores in 2 attempts"):
        await ruler_score_group(group(), "raw", SAMPLING, RUBRIC, **options)
    with pytest.raises(RulerError, match=r"refused the request.*structured_output=False"):
        await ruler_score_group(
            group(), "raw", SAMPLING, RUBRIC, client=client
        )  # response_format: a 400 here

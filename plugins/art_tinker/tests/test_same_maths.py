"""Same maths both ways: one batch through TinkerBackend + loopback and through LocalBackend gives the same loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tinker_harness import Server, rollout_groups

import art_core as art
from art_tinker import TinkerBackend

# built-in cispo, built-in ppo, and three options only the client-side custom loss can express
OPTIONS: list[dict[str, Any]] = [
    {},
    {"ppo": True, "epsilon": 0.1, "advantage_balance": 0.5},
    {"importance_sampling_level": "sequence"},
    {"importance_sampling_level": "geometric_average", "ppo": True, "scale_rewards": False},
    {"truncated_importance_sampling": 1.01, "epsilon_high": 0.5},
]


def _model(base_path: Path, tiny_model: str) -> art.TrainableModel:
    return art.TrainableModel(
        name="maths", project="same", base_model=tiny_model, base_path=str(base_path), report_metrics=[]
    )


async def test_the_same_batch_gives_the_same_loss_at_step_0(
    server: Server, tiny_model: str, tmp_path: Path
) -> None:
    from art_local.backend import LocalBackend

    tinker_backend = TinkerBackend(api_key=server.api_key, base_url=server.base_url, lora_rank=4)
    tinker_model = _model(tmp_path / "tinker", tiny_model)
    await tinker_model.register(tinker_backend)
    groups = await rollout_groups(tinker_model, ["Sort these letters: c a b", "What is 2 + 3?"], max_tokens=8)
    local_backend = LocalBackend(path=str(tmp_path / "local"), device="cpu")
    local_model = _model(tmp_path / "local", tiny_model)
    await local_backend.register(local_model)  # training only: no inference server needed
    losses = []
    try:
        for options in OPTIONS:  # a ~1e-30 AdamW step leaves both at the base weights: "step 0"
            via_tinker = await tinker_backend.train(tinker_model, groups, learning_rate=1e-30, **options)
            via_local = await local_backend.train(
                local_model, groups, learning_rate=1e-30, save_checkpoint=False, **options
            )
            assert (
                via_tinker.metrics["data/step_trainer_tokens"]
                == via_local.metrics["data/step_trainer_tokens"]
            )
            assert via_tinker.metrics["loss/train"] == pytest.approx(
                via_local.metrics["loss/train"], abs=1e-4
            ), options
            losses.append(via_tinker.metrics["loss/train"])
    finally:
        await tinker_backend.close()
        await local_backend.close()
    assert len({round(loss, 4) for loss in losses}) >= 3  # the options really change the loss

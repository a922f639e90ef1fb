"""Valid calls, per backend: mypy and pyright accept every line (checked by tests/test_static_typing.py).

Each backend's own options type-check on that backend, each ``train()`` returns its own result type, and one
backend-agnostic function typed against ``art.TrainableBackend`` accepts every backend.
"""

from __future__ import annotations

from typing import assert_type

from art_bigram import BigramBackend

import art_core as art
from art_core.testing import StrictBackend
from art_local import LocalBackend
from art_serverless import ServerlessBackend
from art_tinker import TinkerBackend

Groups = list[art.TrajectoryGroup]


async def agnostic_step(
    backend: art.TrainableBackend, model: art.TrainableModel, groups: Groups
) -> art.TrainResult:
    """The common subset, with every option: fine on every backend."""
    return await backend.train(
        model,
        groups,
        learning_rate=1e-5,
        ppo=True,
        epsilon=0.2,
        epsilon_high=0.28,
        advantage_balance=0.1,
        scale_rewards=False,
        importance_sampling_level="sequence",
    )


async def local(model: art.TrainableModel, groups: Groups) -> None:
    backend = LocalBackend(".art", device="cpu")
    result = await backend.train(
        model,
        groups,
        learning_rate=1e-5,
        max_negative_advantage_importance_sampling_weight=2.0,
        mask_prob_ratio=True,
        kimi_k2_tau=0.1,
        precalculate_logprobs=True,
        allow_training_without_logprobs=True,
        plot_tensors=True,
        truncated_importance_sampling=2.0,
        scale_learning_rate_by_reward_std_dev=True,
        logprob_calculation_chunk_size=512,
        kl_penalty_coef=0.1,
        save_checkpoint=False,
        verbose=True,
    )
    assert_type(result, art.LocalTrainResult)
    assert_type(result.checkpoint_path, str | None)
    assert_type(await agnostic_step(backend, model, groups), art.TrainResult)


async def serverless(model: art.TrainableModel, groups: Groups) -> None:
    backend = ServerlessBackend(api_key="key", base_url="http://127.0.0.1:8000")
    result = await backend.train(
        model,
        groups,
        max_negative_advantage_importance_sampling_weight=2.0,
        mask_prob_ratio=True,
        kimi_k2_tau=0.1,
        precalculate_logprobs=True,
        verbose=True,
    )
    assert_type(result, art.ServerlessTrainResult)
    assert_type(result.artifact_name, str)
    assert_type(await agnostic_step(backend, model, groups), art.TrainResult)


async def tinker(model: art.TrainableModel, groups: Groups) -> None:
    backend = TinkerBackend(base_url="http://127.0.0.1:8080", lora_rank=8)
    result = await backend.train(
        model,
        groups,
        allow_training_without_logprobs=True,
        plot_tensors=True,
        truncated_importance_sampling=2.0,
        save_checkpoint=False,
        deploy_checkpoint=True,
        train_mlp=True,
        train_attn=True,
        train_unembed=False,
        verbose=True,
    )
    assert_type(result, art.TinkerTrainResult)
    assert_type(result.sampler_path, str | None)
    assert_type(result.deployed, bool)
    assert_type(await agnostic_step(backend, model, groups), art.TrainResult)


async def strict(model: art.TrainableModel, groups: Groups) -> None:
    backend = StrictBackend()
    result = await backend.train(
        model, groups, learning_rate=0.5, importance_sampling_level="geometric_average"
    )
    assert_type(result, art.TrainResult)
    assert_type(await agnostic_step(backend, model, groups), art.TrainResult)


async def log_after_train(model: art.TrainableModel, groups: Groups, backend: art.TrainableBackend) -> None:
    """The documented loop: train, then log the step's metrics."""
    result = await backend.train(model, groups)
    await model.log(groups, metrics=result.metrics, step=result.step)
    config = art.dev.TrainConfig(ppo=True, importance_sampling_level="token", plot_tensors=True)
    assert_type(config, art.dev.TrainConfig)


async def third_party(model: art.TrainableModel, groups: Groups) -> None:
    """The example plugin (examples/third_party_backend) is a TrainableBackend too, with its own option."""
    backend = BigramBackend()
    result = await backend.train(model, groups, learning_rate=0.5, max_grad_norm=1.0, verbose=True)
    assert_type(result, art.TrainResult)
    assert_type(await agnostic_step(backend, model, groups), art.TrainResult)


async def sft_then_rl(model: art.TrainableModel, data: list[art.Trajectory], groups: Groups) -> None:
    """Every backend is an SFTBackend; each keeps its own typed SFT options."""
    backends: list[art.SFTBackend] = [LocalBackend(), ServerlessBackend(api_key="k"), TinkerBackend()]
    for backend in backends:
        result: art.TrainResult = await backend.train_sft(
            model, data, learning_rate=1e-4, schedule="constant"
        )
        print(result.step)
    local = await LocalBackend().train_sft(model, data, epochs=2, save_checkpoint=False, verbose=True)
    print(local.checkpoint_path)
    tinker = await TinkerBackend().train_sft(model, data, assistant_turns="last", deploy_checkpoint=True)
    print(tinker.sampler_path)
    for trajectory in art.read_sft_jsonl("data.jsonl"):
        print(trajectory.tools)

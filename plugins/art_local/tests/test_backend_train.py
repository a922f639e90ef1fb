"""LocalBackend: train() results, metrics, checkpoints, every option's visible effect, bad input, serving."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import art_core as art
from art_core.results import LocalTrainResult
from art_core.testing import BackendConformance
from art_local.backend import LocalBackend
from art_local.training import TrainerConfig, compute_logprobs, get_weights, pack_sequences, tokenize_history
from art_local.training.logprobs import causal_lm

RL_MATH_KEYS = {
    "loss/train",
    "loss/entropy",
    "loss/grad_norm",
    "loss/learning_rate",
    "data/step_num_groups_submitted",
    "data/step_num_groups_trainable",
    "data/step_num_trajectories",
    "data/step_trainer_tokens",
    "data/step_num_gradient_steps",
    "time/step_trainer_s",
}

Groups = Callable[..., list[Any]]


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(str(tmp_path / "art"), device="cpu")
    yield local
    await local.close()


async def _model(backend: LocalBackend, tiny_model_dir: Path, name: str = "m") -> art.TrainableModel:
    model = art.TrainableModel(name=name, project="p", base_model=str(tiny_model_dir))
    await backend.register(model)
    return model


def _weights(backend: LocalBackend, model: art.TrainableModel) -> dict[str, torch.Tensor]:
    return get_weights(backend._slots[model.name].components)


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


async def test_train_returns_a_local_result_with_rl_math_metrics_and_a_checkpoint(
    backend: LocalBackend, tiny_model_dir: Path, sort_groups: Groups
) -> None:
    model = await _model(backend, tiny_model_dir)
    assert model.base_path == backend._path and await backend._get_step(model) == 0
    result = await backend.train(model, sort_groups(2), learning_rate=1e-2)
    assert isinstance(result, LocalTrainResult) and result.step == 1
    assert RL_MATH_KEYS <= set(result.metrics) and "loss/kl_policy_ref" not in result.metrics
    assert result.metrics["data/step_num_groups_trainable"] == 2
    assert result.metrics["data/step_num_gradient_steps"] == 1
    assert all(math.isfinite(value) for value in result.metrics.values())
    spans = {key: result.metrics[f"time/step_{key}_s"] for key in ("prepare", "tokenize", "pack", "trainer")}
    assert 0 < spans["tokenize"] + spans["pack"] <= spans["prepare"] < spans["trainer"]  # parts of the whole
    checkpoint = model.output_dir() / "checkpoints" / "0001"
    assert result.checkpoint_path == str(checkpoint)
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "metadata.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert await backend._get_step(model) == 1 and backend._model_inference_name(model, 1) == "m@1"
    assert isinstance(backend, art.TrainableBackend)


async def test_save_checkpoint_false_writes_nothing_yet_advances(
    backend: LocalBackend, tiny_model_dir: Path, sort_groups: Groups
) -> None:
    model = await _model(backend, tiny_model_dir)
    result = await backend.train(model, sort_groups(1), save_checkpoint=False)
    checkpoints = model.output_dir() / "checkpoints"
    assert result.step == 1 and result.checkpoint_path is None
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    again = await backend.train(model, sort_groups(1))
    assert again.step == 2 and sorted(p.name for p in checkpoints.iterdir()) == ["0002"]


async def test_a_batch_without_signal_advances_the_step_and_trains_nothing(
    backend: LocalBackend, tiny_model_dir: Path, sort_groups: Groups
) -> None:
    model = await _model(backend, tiny_model_dir)
    before = _weights(backend, model)
    result = await backend.train(model, sort_groups(2, rewards=(1.0, 1.0, 1.0, 1.0)), learning_rate=1.0)
    assert result.step == 1 and result.metrics["data/step_num_groups_trainable"] == 0
    assert result.metrics["data/step_num_gradient_steps"] == 0
    assert not _changed(before, _weights(backend, model))


async def test_bad_input_fails_clearly_and_changes_nothing(
    backend: LocalBackend,
    tiny_model_dir: Path,
    sort_groups: Groups,
    make_choice: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    model = await _model(backend, tiny_model_dir)
    user = {"role": "user", "content": "hi"}
    no_logprobs = [
        art.TrajectoryGroup(
            [
                art.Trajectory(messages_and_choices=[user, make_choice("a", with_logprobs=False)], reward=r)
                for r in (0, 1)
            ]
        )
    ]
    with pytest.raises(ValueError, match=r"logprobs=True"):
        await backend.train(model, no_logprobs)
    nan_groups = sort_groups(1)
    nan_groups[0].trajectories[1].reward = float("nan")
    with pytest.raises(ValueError, match="nan"):
        await backend.train(model, nan_groups)
    with pytest.raises(ValueError, match="advantage_balance"):
        await backend.train(model, sort_groups(1), advantage_balance=2.0)
    with pytest.raises(TypeError):
        await backend.train(model, sort_groups(1), not_an_option=True)  # type: ignore[call-arg]
    assert await backend._get_step(model) == 0 and not (model.output_dir() / "checkpoints").exists()
    stranger = art.TrainableModel(name="stranger", project="p", base_model=str(tiny_model_dir))
    with pytest.raises(ValueError, match="not registered"):
        await backend.train(stranger, sort_groups(1))
    missing = art.TrainableModel(name="missing", project="p", base_model=str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        await backend.register(missing)
    assert not missing.output_dir().exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unknown = art.TrainableModel(name="unknown", project="p", base_model="no-such-org/no-such-model")
    with pytest.raises(ValueError, match="no-such-org/no-such-model"):
        await backend.register(unknown)
    other = LocalBackend(str(tmp_path / "other"), device="cpu")
    model._backend = backend  # as model.register(backend) leaves it (without starting the server)
    with pytest.raises(ValueError, match="already registered"):
        await other.register(model)
    await other.close()
    same_path = LocalBackend(backend._path, device="cpu")
    with pytest.raises(RuntimeError, match="already being trained"):
        await same_path.register(art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir)))
    await same_path.close()


async def _pair(
    backend: LocalBackend, tiny_model_dir: Path, tag: str
) -> tuple[art.TrainableModel, art.TrainableModel]:
    return await _model(backend, tiny_model_dir, f"{tag}-a"), await _model(
        backend, tiny_model_dir, f"{tag}-b"
    )


async def test_loss_and_advantage_options_change_the_step(
    backend: LocalBackend, tiny_model_dir: Path, sort_groups: Groups, make_choice: Callable[..., Any]
) -> None:
    groups = sort_groups(2, logprob=-2.0)
    mixed = [*sort_groups(1), *sort_groups(2, rewards=(0.2, 0.0, 0.0, 0.0))[1:]]
    cases: list[tuple[str, list[Any], dict[str, Any]]] = [
        ("ppo", groups, {"ppo": True}),
        ("precalculate_logprobs", groups, {"precalculate_logprobs": True}),
        ("importance_sampling_level", groups, {"importance_sampling_level": "sequence", "ppo": True}),
        ("advantage_balance", groups, {"advantage_balance": 0.5}),
        ("scale_rewards", mixed, {"scale_rewards": False}),
    ]
    for name, batch, options in cases:
        base, changed = await _pair(backend, tiny_model_dir, name.replace("_", "-"))
        plain = await backend.train(base, batch, learning_rate=1e-2, save_checkpoint=False)
        varied = await backend.train(changed, batch, learning_rate=1e-2, save_checkpoint=False, **options)
        differs = plain.metrics["loss/train"] != pytest.approx(varied.metrics["loss/train"], rel=1e-4)
        assert differs or _changed(_weights(backend, base), _weights(backend, changed)), name


async def test_learning_rate_and_its_reward_std_scaling_reach_the_optimizer(
    backend: LocalBackend, tiny_model_dir: Path, sort_groups: Groups
) -> None:
    frozen, moving, scaled = [
        await _model(backend, tiny_model_dir, n) for n in ("frozen", "moving", "scaled")
    ]
    start = _weights(backend, frozen)
    with pytest.raises(
        ValueError, match=r"learning_rate=0\.0 is invalid: learning_rate must be a finite number and > 0"
    ):
        await backend.train(frozen, sort_groups(2), learning_rate=0.0)
    assert not _changed(start, _weights(backend, frozen)) and await backend._get_step(frozen) == 0
    plain = await backend.train(moving, sort_groups(2), learning_rate=1e-2)
    result = await backend.train(
        scaled, sort_groups(2), learning_rate=1e-2, scale_learning_rate_by_reward_std_dev=True
    )
    reward_std = math.sqrt(3) / 4  # rewards (1, 0, 0, 0) in every group
    assert plain.metrics["loss/learning_rate"] == 1e-2
    assert result.metrics["loss/learning_rate"] == pytest.approx(1e-2 * reward_std)
    assert _changed(_weights(backend, moving), _weights(backend, scaled))


async def test_kl_penalty_reports_divergence_from_the_base_model(
    backend: LocalBackend, tiny_model_dir: Path, sort_groups: Groups
) -> None:
    model = await _model(backend, tiny_model_dir)
    await backend.train(model, sort_groups(2), learning_rate=5e-2)
    result = await backend.train(model, sort_groups(2), learning_rate=5e-2, kl_penalty_coef=0.5)
    assert result.metrics["loss/kl_policy_ref"] != 0.0 and math.isfinite(result.metrics["loss/kl_policy_ref"])


async def test_chunk_size_plots_verbose_and_logprob_free_training(
    backend: LocalBackend,
    tiny_model_dir: Path,
    sort_groups: Groups,
    make_choice: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = await _model(backend, tiny_model_dir)
    lm_head = causal_lm(backend._slots["m"].components.model).get_output_embeddings()
    seen: list[int] = []
    handle = lm_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    try:
        await backend.train(
            model, sort_groups(2), logprob_calculation_chunk_size=4, plot_tensors=True, verbose=True
        )
    finally:
        handle.remove()
    assert seen and max(seen) <= 4
    png = model.output_dir() / "tensors" / "0001.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    err = capsys.readouterr().err
    assert "[art_local] m step 1:" in err
    assert "→ step" not in err  # the per-step bar shows on a terminal only, never in captured logs
    user = {"role": "user", "content": "Sort these letters: d a c"}
    plain = [
        art.TrajectoryGroup(
            [
                art.Trajectory(messages_and_choices=[user, make_choice(a, with_logprobs=False)], reward=r)
                for a, r in (("acd", 1.0), ("dca", 0.0))
            ]
        )
    ]
    result = await backend.train(model, plain, allow_training_without_logprobs=True)
    assert result.metrics["data/step_trainer_tokens"] > 0


@pytest.mark.parametrize("lora_rank", [8, None], ids=["lora", "full"])
async def test_published_weights_are_the_trained_ones(
    tmp_path: Path, tiny_model_dir: Path, sort_groups: Groups, tiny_tokenizer: Any, lora_rank: int | None
) -> None:
    backend = LocalBackend(str(tmp_path), device="cpu", trainer_config=TrainerConfig(lora_rank=lora_rank))
    try:
        model = art.TrainableModel(name="served", project="p", base_model=str(tiny_model_dir))
        await model.register(backend)
        await backend.train(model, sort_groups(2), learning_rate=5e-2)
        messages = [{"role": "user", "content": "Sort these letters: d a c"}]

        async def sample_step_1() -> Any:
            return await model.openai_client().chat.completions.create(
                model=model.get_inference_name(1),
                messages=messages,
                logprobs=True,
                max_tokens=4,  # type: ignore[arg-type]
                seed=3,
            )

        completion = await sample_step_1()
        choice = completion.choices[0]
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(entry.token.startswith("token_id:") for entry in choice.logprobs.content)
        history = tokenize_history([*messages, choice], None, tiny_tokenizer)
        assert history is not None
        batch = pack_sequences([_sequence(history)], capacity=256)
        ours = compute_logprobs(backend._slots["served"].components, batch)[batch.loss_mask_BT]
        served = torch.tensor([entry.logprob for entry in choice.logprobs.content])
        torch.testing.assert_close(ours, served, atol=2e-4, rtol=0)
        # the server copied step 1's weights: the next steps (trained in place) leave its samples alone
        for _ in range(2):
            await backend.train(model, sort_groups(2), learning_rate=5e-2, save_checkpoint=False)
        again = (await sample_step_1()).choices[0].logprobs
        assert again is not None and again.content == choice.logprobs.content
    finally:
        await backend.close()


def _sequence(history: Any) -> Any:
    from art_local.training import PackSequence

    return PackSequence(history.tokens, history.trained, history.logprobs)


async def test_sampled_rewards_rise_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    """Real rollouts from the server, real logprobs, reward = first token id is even: the reward climbs."""
    backend = LocalBackend(str(tmp_path), device="cpu", trainer_config=TrainerConfig(lora_rank=None))
    try:
        model = art.TrainableModel(name="even", project="p", base_model=str(tiny_model_dir))
        await model.register(backend)
        client = model.openai_client()
        messages = [{"role": "user", "content": "Pick a token"}]
        rewards: list[float] = []
        for _ in range(12):
            completion = await client.chat.completions.create(
                model=model.get_inference_name(),
                messages=messages,
                logprobs=True,
                max_tokens=1,
                n=16,  # type: ignore[arg-type]
            )
            trajectories = []
            for choice in completion.choices:
                first = int(choice.logprobs.content[0].token.split(":")[1])  # type: ignore[union-attr]
                trajectories.append(
                    art.Trajectory(messages_and_choices=[*messages, choice], reward=float(first % 2 == 0))
                )
            rewards.append(sum(t.reward for t in trajectories) / len(trajectories))
            await backend.train(
                model, [art.TrajectoryGroup(trajectories)], learning_rate=3e-2, save_checkpoint=False
            )
        assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.25, rewards  # measured: 0.40 → 0.94
    finally:
        await backend.close()


async def test_delete_checkpoints_and_resume(
    tmp_path: Path, tiny_model_dir: Path, sort_groups: Groups
) -> None:
    backend = LocalBackend(str(tmp_path), device="cpu")
    model = art.TrainableModel(name="kept", project="p", base_model=str(tiny_model_dir))
    await backend.register(model)
    for _ in range(3):
        await backend.train(model, sort_groups(1), learning_rate=1e-2)
    await model.log(metrics={"reward": 1.0}, split="val", step=2)
    model._backend = backend  # as model.register(backend) leaves it (without starting the server)
    assert await model.delete_checkpoints() == [2, 3]
    assert sorted(p.name for p in (model.output_dir() / "checkpoints").iterdir()) == ["0002", "0003"]
    trained = _weights(backend, model)
    await backend.close()
    resumed_backend = LocalBackend(str(tmp_path), device="cpu")
    again = art.TrainableModel(name="kept", project="p", base_model=str(tiny_model_dir))
    await resumed_backend.register(again)
    try:
        assert await resumed_backend._get_step(again) == 3
        assert not _changed(trained, _weights(resumed_backend, again))
        assert (await resumed_backend.train(again, sort_groups(1))).step == 4
    finally:
        await resumed_backend.close()


class TestLocalBackendConformance(BackendConformance):
    """art_core's conformance kit on LocalBackend with the tiny model (real server, real rollouts)."""

    learning_rate = 1e-2

    @pytest.fixture
    def backend(self, tmp_path: Path) -> LocalBackend:
        return LocalBackend(str(tmp_path / "conformance"), device="cpu")

    @pytest.fixture
    def base_model(self, tiny_model_dir: Path) -> str:
        return str(tiny_model_dir)

    @pytest.fixture
    def fresh_backend(self, tmp_path: Path) -> Callable[[], LocalBackend]:
        return lambda: LocalBackend(str(tmp_path / "conformance"), device="cpu")


def test_vllm_engine_is_refused_for_a_full_fine_tune(tmp_path: Path) -> None:
    from art_local.training import TrainerConfig

    with pytest.raises(ValueError, match="cannot serve a full fine-tune"):
        LocalBackend(str(tmp_path), trainer_config=TrainerConfig(lora_rank=None), engine="vllm")
    auto = LocalBackend(str(tmp_path), trainer_config=TrainerConfig(lora_rank=None))
    assert auto._service_options["engine"] == "hf"


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_serving_adapter_is_a_loadable_peft_directory_and_old_ones_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from art_local.backend import write_serving_adapter
    from art_local.tiny import build_tiny_model

    base = build_tiny_model("tiny")
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    import os

    from art_core import durable

    fsynced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        durable.os,
        "fsync",
        lambda fd: fsynced.append(os.path.realpath(f"/proc/self/fd/{fd}")) or real_fsync(fd),
    )
    for step in (1, 2, 3):
        directory = write_serving_adapter(model, tmp_path, step)
    assert any(path.endswith("adapter_model.safetensors") for path in fsynced)  # durable before it is served
    assert str(tmp_path / "serving") in fsynced
    assert sorted(p.name for p in (tmp_path / "serving").iterdir()) == ["0002", "0003"]
    assert (directory / "adapter_config.json").is_file()
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(directory))
    original = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    loaded = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)

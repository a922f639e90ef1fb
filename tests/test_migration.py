"""ART's `model.train(groups, config=..., _config=...)`: deprecated, mapped onto backend options, logged like ART."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from core_support import make_groups

import art_core as art
from art_core.migration import backend_train_kwargs, train_options
from art_core.testing import StrictBackend, StrictStorage

REWARDS = [[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]]


async def strict_model(
    base_path: str, storage: StrictStorage | None = None
) -> tuple[art.TrainableModel, StrictBackend]:
    model = art.TrainableModel(
        name="m", project="p", base_model="strict-letters", base_path=base_path, report_metrics=[]
    )
    backend = StrictBackend(storage)
    await model.register(backend)
    return model, backend


def history(model: art.TrainableModel) -> list[dict[str, Any]]:
    path = model.output_dir() / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_model_train_warns_maps_the_configs_and_logs_like_art(base_path: str, tmp_path: Path) -> None:
    old_style, new_style = StrictStorage(), StrictStorage()
    model, backend = await strict_model(base_path, old_style)
    config = art.TrainConfig(learning_rate=0.5)
    dev_config = art.dev.TrainConfig(ppo=True, epsilon=0.3, scale_rewards=False, advantage_balance=0.25)
    with pytest.warns(
        DeprecationWarning, match=r"backend\.train\(model, groups, learning_rate=0\.5, ppo=True"
    ):
        result = await model.train(make_groups(REWARDS), config=config, _config=dev_config)
    assert isinstance(result, art.TrainResult) and result.step == 1 == await model.get_step()

    # the same options passed to backend.train directly give exactly the same weights
    twin, twin_backend = await strict_model(str(tmp_path / "twin"), new_style)
    direct = await twin_backend.train(
        twin,
        make_groups(REWARDS),
        learning_rate=0.5,
        ppo=True,
        epsilon=0.3,
        scale_rewards=False,
        advantage_balance=0.25,
    )
    assert old_style.checkpoints["m"][1] == new_style.checkpoints["m"][1]
    defaults, defaults_backend = await strict_model(str(tmp_path / "defaults"))
    plain = await defaults_backend.train(defaults, make_groups(REWARDS))
    assert plain.metrics["loss/learning_rate"] == 5e-6 != result.metrics["loss/learning_rate"]
    assert result.metrics["loss/train"] == direct.metrics["loss/train"] != plain.metrics["loss/train"]

    # one history line at the new step: the groups' metrics under train/ and the step's training metrics
    (record,) = history(model)
    assert record["step"] == 1 and record["train/reward"] == pytest.approx(2.5 / 6)
    assert record["loss/train"] == result.metrics["loss/train"]
    assert record["data/step_num_groups_trainable"] == 2.0
    assert (model.output_dir() / "trajectories" / "train" / "0001.parquet").exists()
    for each in (backend, twin_backend, defaults_backend):
        await each.close()


@pytest.mark.parametrize(
    ("config", "dev_config", "verbose", "named"),
    [
        (None, {"plot_tensors": True}, False, "plot_tensors (from _config)"),
        (art.TrainConfig(kl_penalty_coef=0.1), None, False, "kl_penalty_coef (from config)"),
        (
            art.TrainConfig(grad_accumulation_sequences=2),
            None,
            False,
            "grad_accumulation_sequences (from config)",
        ),
        (None, {"scale_reward": False}, False, "scale_reward (from _config)"),  # a typo is refused too
        (None, None, True, "verbose (from verbose=True)"),
    ],
)
async def test_a_key_the_backend_lacks_is_a_type_error_listing_its_options(
    base_path: str, config: art.TrainConfig | None, dev_config: Any, verbose: bool, named: str
) -> None:
    model, backend = await strict_model(base_path)
    with (
        pytest.warns(DeprecationWarning, match=r"backend\.train\(model, "),
        pytest.raises(TypeError, match=r"StrictBackend\.train\(\) has no option ") as error,
    ):
        await model.train(make_groups(REWARDS), config, dev_config, verbose)
    assert named in str(error.value)
    assert "its options are: learning_rate, ppo, epsilon, epsilon_high, advantage_balance" in str(error.value)
    assert await model.get_step() == 0 and history(model) == []
    await backend.close()


async def test_conflicting_values_and_wrong_config_types_are_refused(base_path: str) -> None:
    model, backend = await strict_model(base_path)
    groups = make_groups(REWARDS)
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ValueError, match="kl_penalty_coef is 0.1 in config"),
    ):
        await model.train(groups, art.TrainConfig(kl_penalty_coef=0.1), {"kl_penalty_coef": 0.2})
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(TypeError, match="config must be an art.TrainConfig"),
    ):
        await model.train(groups, {"learning_rate": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta=0.1 was ART's KL loss coefficient"):
        art.TrainConfig(beta=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="extra"):
        art.TrainConfig(learning_rat=0.1)  # type: ignore[call-arg]
    assert art.TrainConfig(beta=0.0).model_fields_set == set()  # type: ignore[call-arg]
    assert await model.get_step() == 0 and history(model) == []
    await backend.close()


def test_options_are_read_from_each_shipped_backends_signature() -> None:
    """The mapping introspects the real classes: what each backend lacks is refused, what it has passes."""
    local = pytest.importorskip("art_local").LocalBackend
    serverless = pytest.importorskip("art_serverless").ServerlessBackend
    tinker = pytest.importorskip("art_tinker").TinkerBackend
    everything = art.dev.TrainConfig(
        kl_penalty_coef=0.1, logprob_calculation_chunk_size=64, plot_tensors=True
    )
    assert backend_train_kwargs(local.train, "LocalBackend", art.TrainConfig(), everything, True) == {
        "kl_penalty_coef": 0.1,
        "logprob_calculation_chunk_size": 64,
        "plot_tensors": True,
        "verbose": True,
    }
    with pytest.raises(TypeError, match=r"no option kl_penalty_coef \(from _config\), logprob_calc"):
        backend_train_kwargs(tinker.train, "TinkerBackend", None, everything, False)
    with pytest.raises(
        TypeError, match=r"no option plot_tensors \(from _config\); its options are: .*verbose"
    ):
        backend_train_kwargs(serverless.train, "ServerlessBackend", None, {"plot_tensors": True}, False)
    assert "deploy_checkpoint" in train_options(tinker.train)[0]
    assert "deploy_checkpoint" not in train_options(local.train)[0]
    assert backend_train_kwargs(serverless.train, "S", art.TrainConfig(learning_rate=1e-5), None, False) == {
        "learning_rate": 1e-5,
        "verbose": False,
    }


async def test_model_train_on_the_real_local_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ART-style call on LocalBackend: each mapped option has its visible effect, then one ART-style log."""
    local = pytest.importorskip("art_local")
    from art_local.tiny import build_tiny_model

    backend = local.LocalBackend(str(tmp_path / "art"), device="cpu")
    model = art.TrainableModel(
        name="m", project="p", base_model=str(build_tiny_model("tiny")), base_path=str(tmp_path / "art")
    )
    model.report_metrics = []
    try:
        await model.register(backend)
        client = model.openai_client()

        async def rollout(prompt: str, reward: float) -> art.Trajectory:
            messages: list[Any] = [{"role": "user", "content": prompt}]
            completion = await client.chat.completions.create(
                model=model.get_inference_name(), messages=messages, max_tokens=6, logprobs=True
            )
            return art.Trajectory(messages_and_choices=[*messages, completion.choices[0]], reward=reward)

        groups = await art.gather_trajectory_groups(
            [art.TrajectoryGroup(rollout(p, r) for r in (0.0, 1.0, 0.5)) for p in ("sort b a", "sort d c")],
            pbar_desc=None,
        )
        with pytest.warns(
            DeprecationWarning, match=r"backend\.train\(model, groups, learning_rate=0\.01, kl_"
        ):
            result = await model.train(
                groups,
                config=art.TrainConfig(learning_rate=1e-2, kl_penalty_coef=0.5),
                _config=art.dev.TrainConfig(plot_tensors=True, logprob_calculation_chunk_size=4),
                verbose=True,
            )
        assert isinstance(result, art.LocalTrainResult) and result.step == 1
        assert result.metrics["loss/learning_rate"] == 1e-2 and "loss/kl_policy_ref" in result.metrics
        assert (model.output_dir() / "tensors" / "0001.png").exists()  # plot_tensors reached the backend
        assert "[art_local] m step 1:" in capsys.readouterr().err  # so did verbose
        (record,) = history(model)
        assert record["step"] == 1 and "train/reward" in record and "loss/kl_policy_ref" in record
        with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="no option deploy_checkpoint"):
            await model.train(groups, _config={"deploy_checkpoint": True})  # type: ignore[typeddict-unknown-key]
        assert await model.get_step() == 1
    finally:
        await backend.close()

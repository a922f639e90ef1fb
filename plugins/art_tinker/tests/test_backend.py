"""TinkerBackend end to end against ``art tinker serve``: RL steps with rollouts, resume, delete, options."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import openai
import pytest
import tinker
from tinker_harness import Server, rollout_groups

import art_core as art
from art_core.testing.quick import protocol_problems, train_signature_problems
from art_tinker import TinkerBackend

PROMPTS = ["Sort these letters: c a b", "What is 2 + 3?"]


def _model(tmp_path: Path, tiny_model: str, name: str = "agent") -> art.TrainableModel:
    return art.TrainableModel(
        name=name, project="tinker-test", base_model=tiny_model, base_path=str(tmp_path), report_metrics=[]
    )


def _backend(server: Server) -> TinkerBackend:
    return TinkerBackend(api_key=server.api_key, base_url=server.base_url, lora_rank=4)


async def _probe_loss(backend: TinkerBackend, model: art.TrainableModel) -> float:
    """Cross-entropy of a fixed sequence under the model's current training weights (a weights fingerprint)."""
    client = backend._models[model.name].training_client
    assert client is not None
    tokens = backend._models[model.name].tokenizer.encode(
        "<|im_start|>user\nSort these letters: b a c<|im_end|>\n"
    )
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
    )
    output = await client.forward([datum], "cross_entropy").result_async(120)
    return float(output.metrics["loss:sum"])


def test_satisfies_trainable_backend_structurally() -> None:
    assert protocol_problems(TinkerBackend) == []
    assert train_signature_problems(TinkerBackend.train) == []
    parameters = inspect.signature(TinkerBackend.train).parameters
    assert parameters["train_unembed"].default is False and parameters["deploy_checkpoint"].default is False
    assert isinstance(TinkerBackend(), art.TrainableBackend)


async def test_three_rl_steps_then_resume_with_a_fresh_backend_then_delete(
    server: Server, tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = _backend(server)
    model = _model(tmp_path, tiny_model)
    await model.register(backend)
    results = []
    for step in range(1, 4):
        groups = await rollout_groups(model, PROMPTS)
        result = await backend.train(model, groups, learning_rate=5e-3, verbose=step == 1)
        await model.log(groups, metrics=result.metrics, step=result.step)
        assert isinstance(result, art.TinkerTrainResult) and result.step == step == await model.get_step()
        assert (
            result.state_path
            == f"tinker://{backend._models[model.name].record.model_ids[0]}/weights/step-{step:06d}"
        )  # type: ignore[union-attr]
        assert result.sampler_path is None and result.deployed is False
        results.append(result)
    assert "forward_backward cispo clip [0, 5]" in capsys.readouterr().err  # verbose=True on step 1 only
    for result in results:
        assert (
            result.metrics["data/step_num_groups_trainable"] == 2
            and result.metrics["data/step_trainer_tokens"] > 0
        )
        assert {"loss/train", "loss/grad_norm", "loss/learning_rate", "time/step_trainer_s"} <= set(
            result.metrics
        )
    record = json.loads((model.output_dir() / "tinker_run.json").read_text())
    assert record["step"] == 3 and sorted(record["checkpoints"]) == ["1", "2", "3"]

    client = model.openai_client()
    for name in (model.get_inference_name(), model.get_inference_name(2), model.get_inference_name(0)):
        answer = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True
        )
        assert answer.choices[0].logprobs is not None
        assert all(e.token.startswith("token_id:") for e in answer.choices[0].logprobs.content or [])
    trained = await _probe_loss(backend, model)
    await backend.close()

    again = _backend(server)
    reopened = _model(tmp_path, tiny_model)
    await reopened.register(again)
    assert await reopened.get_step() == 3
    assert await _probe_loss(again, reopened) == pytest.approx(trained, abs=1e-4)  # resumed weights, not base
    result = await again.train(reopened, await rollout_groups(reopened, PROMPTS[:1]), learning_rate=5e-3)
    assert result.step == 4
    run_ids = again._models[reopened.name].record.model_ids  # type: ignore[union-attr]
    assert len(run_ids) == 2  # the resumed run is a new Tinker training run

    await again._delete_checkpoint_files(reopened, [1, 4])
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    left = sorted(
        c.checkpoint_id for rid in run_ids for c in rest.list_checkpoints(rid).result(60).checkpoints
    )
    assert left == ["weights/step-000001", "weights/step-000004"]
    with pytest.raises(openai.NotFoundError):
        await reopened.openai_client().chat.completions.create(
            model=reopened.get_inference_name(2), messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert sorted(json.loads((reopened.output_dir() / "tinker_run.json").read_text())["checkpoints"]) == [
        "1",
        "4",
    ]
    await again.close()


async def test_options_change_what_happens(server: Server, tiny_model: str, tmp_path: Path) -> None:
    backend = _backend(server)
    model = _model(tmp_path, tiny_model, "options")
    await model.register(backend)
    groups = await rollout_groups(model, PROMPTS[:1])
    with pytest.raises(TypeError):
        await backend.train(model, groups, logprob_calculation_chunk_size=512)  # type: ignore[call-arg]
    deployed = await backend.train(
        model, groups, save_checkpoint=False, deploy_checkpoint=True, plot_tensors=True, train_mlp=False
    )
    assert deployed.state_path is None and deployed.deployed is True
    assert deployed.sampler_path is not None and deployed.sampler_path.endswith(
        "/sampler_weights/step-000001"
    )
    assert (model.output_dir() / "tensors" / "0001.png").stat().st_size > 0
    with pytest.raises(ValueError, match="fixed on the first train"):
        await backend.train(model, groups, train_mlp=True)
    flat = await backend.train(
        model, await rollout_groups(model, PROMPTS[:1], step=1), train_mlp=False, ppo=True
    )
    no_signal = await backend.train(
        model, [art.TrajectoryGroup(g.trajectories[:1]) for g in groups], train_mlp=False
    )
    assert flat.step == 2 and no_signal.step == 3
    assert no_signal.metrics["data/step_num_groups_trainable"] == 0
    assert no_signal.metrics["data/step_num_gradient_steps"] == 0
    with pytest.raises(ValueError, match="advantage_balance"):
        await backend.train(model, groups, advantage_balance=1.5, train_mlp=False)
    blind = [
        art.TrajectoryGroup(
            art.Trajectory(
                messages_and_choices=[
                    *t.messages()[:-1],
                    t.choices()[0].model_copy(update={"logprobs": None}),
                ],
                reward=t.reward,
            )
            for t in group.trajectories
        )
        for group in groups
    ]
    with pytest.raises(ValueError, match="allow_training_without_logprobs"):
        await backend.train(model, blind, train_mlp=False)
    trained_blind = await backend.train(model, blind, train_mlp=False, allow_training_without_logprobs=True)
    assert trained_blind.step == 4 and trained_blind.metrics["data/step_trainer_tokens"] > 0
    await backend.close()


async def test_a_wrong_key_is_an_authentication_error(
    server: Server, tiny_model: str, tmp_path: Path
) -> None:
    backend = TinkerBackend(api_key="tml-not-the-key", base_url=server.base_url)
    with pytest.raises(tinker.AuthenticationError, match="X-API-Key"):
        await _model(tmp_path, tiny_model, "locked-out").register(backend)
    await backend.close()

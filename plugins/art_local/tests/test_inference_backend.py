"""LocalBackend + inference end to end: steps served after train(), sampler/trainer agreement, lifecycle."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import art_core as art
from art_core.trajectories import is_choice
from art_local.backend import LocalBackend
from art_local.inference.hf import HFEngine
from art_local.training import compute_logprobs, prepare_batch

PROMPT: Any = [{"role": "user", "content": "Sort these letters: d a c"}]


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(str(tmp_path / "art"), device="cpu", engine="hf")
    yield local
    await local.close()


async def registered(backend: LocalBackend, base_model: Path, name: str = "agent") -> art.TrainableModel:
    model = art.TrainableModel(name=name, project="p", base_model=str(base_model))
    await model.register(backend)
    return model


async def greedy(model: art.TrainableModel, name: str, tokens: int = 16) -> list[str]:
    response = await model.openai_client().chat.completions.create(
        model=name,
        messages=PROMPT,
        temperature=0,
        max_tokens=tokens,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    assert response.choices[0].logprobs is not None and response.choices[0].logprobs.content is not None
    return [entry.token for entry in response.choices[0].logprobs.content]


async def sampled_groups(model: art.TrainableModel, groups: int = 2, n: int = 4) -> list[art.TrajectoryGroup]:
    """Real rollouts: n sampled Choices per prompt; reward = how many 'a'/'c'/'d' the answer contains."""
    result = []
    for g in range(groups):
        messages: Any = [{"role": "user", "content": f"Sort these letters: d a c ({g})"}]
        response = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=messages, n=n, max_tokens=12, logprobs=True, seed=g
        )
        trajectories = [
            art.Trajectory(
                messages_and_choices=[*messages, choice],
                reward=float(sum(ch in "acd" for ch in choice.message.content or "")) + i,
            )
            for i, choice in enumerate(response.choices)
        ]
        result.append(art.TrajectoryGroup(trajectories))
    return result


def engine_of(backend: LocalBackend) -> HFEngine:
    assert backend._service is not None and isinstance(backend._service.engine, HFEngine)
    return backend._service.engine


def agreement(backend: LocalBackend, model: art.TrainableModel, groups: list[art.TrajectoryGroup]) -> float:
    """Tokenize sampled Choices with the trainer's batch code; check ids; max |trainer − sampler| logprob."""
    slot = backend._slots[model.name]
    prepared = prepare_batch(groups, slot.tokenizer)
    assert prepared.batch is not None
    sampled = sorted(
        tuple(int(e.token.removeprefix("token_id:")) for e in choice.logprobs.content)
        for group in groups
        for trajectory in group.trajectories
        for choice in trajectory.messages_and_choices
        if is_choice(choice)
    )
    trained = sorted(
        tuple(t for t, keep in zip(s.tokens, s.trained, strict=True) if keep) for s in prepared.sequences
    )
    assert trained == sampled  # exactly the sampled token ids, nothing re-tokenized
    mask_BT = prepared.batch.loss_mask_BT
    server_logprobs = prepared.batch.old_logprobs_BT[mask_BT]
    trainer_logprobs = compute_logprobs(slot.components, prepared.batch)[mask_BT]
    assert server_logprobs.numel() == sum(len(ids) for ids in sampled)
    return float((trainer_logprobs - server_logprobs).abs().max())


async def test_train_serves_the_new_step_as_latest_while_step_0_keeps_its_output(
    backend: LocalBackend, tiny_model_dir: Path
) -> None:
    model = await registered(backend, tiny_model_dir)
    assert model.get_inference_name() == "agent" and model.get_inference_name(0) == "agent@0"
    before = await greedy(model, model.get_inference_name())
    assert await greedy(model, model.get_inference_name(0)) == before
    result = await backend.train(model, await sampled_groups(model), learning_rate=5e-2)
    assert result.step == 1
    after = await greedy(model, model.get_inference_name())
    assert after != before
    assert await greedy(model, model.get_inference_name(1)) == after
    assert await greedy(model, model.get_inference_name(0)) == before
    models = [m.id for m in (await model.openai_client().models.list()).data]
    assert {"agent", "agent@0", "agent@1"} <= set(models)


async def test_sampler_and_trainer_agree_on_token_ids_and_logprobs(
    backend: LocalBackend, tiny_model_dir: Path
) -> None:
    model = await registered(backend, tiny_model_dir)
    at_base = agreement(backend, model, await sampled_groups(model))
    await backend.train(model, await sampled_groups(model), learning_rate=2e-2)
    at_step_1 = agreement(
        backend, model, await sampled_groups(model)
    )  # merged LoRA served vs unmerged trained
    print(f"\nmax |trainer - sampler| logprob: step 0 {at_base:.3g}, step 1 {at_step_1:.3g}")
    assert at_base < 1e-4 and at_step_1 < 1e-4


async def test_registering_twice_is_idempotent(backend: LocalBackend, tiny_model_dir: Path) -> None:
    model = await registered(backend, tiny_model_dir)
    url, key = model.inference_base_url, model.inference_api_key
    served = engine_of(backend).describe()
    await model.register(backend)
    twin = await registered(backend, tiny_model_dir)
    assert (twin.inference_base_url, twin.inference_api_key) == (url, key)
    assert engine_of(backend).describe() == served
    assert await greedy(twin, "agent", tokens=3) == await greedy(model, "agent@0", tokens=3)


async def test_close_stops_the_server_and_frees_the_port(tmp_path: Path, tiny_model_dir: Path) -> None:
    backend = LocalBackend(str(tmp_path / "art"), device="cpu", engine="hf")
    model = await registered(backend, tiny_model_dir)
    assert await greedy(model, "agent", tokens=2)
    url = model.inference_base_url
    assert url is not None
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    await backend.close()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"{url}/models")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


async def test_training_while_requests_are_in_flight_never_breaks_a_request(
    backend: LocalBackend, tiny_model_dir: Path
) -> None:
    model = await registered(backend, tiny_model_dir)
    groups = await sampled_groups(model)
    old = await greedy(model, "agent", tokens=150)
    engine = engine_of(backend)
    admitted = engine.batches_run
    inflight = [asyncio.create_task(greedy(model, "agent", tokens=150)) for _ in range(6)]
    for _ in range(2000):
        if engine.batches_run > admitted:
            break
        await asyncio.sleep(0.005)
    await backend.train(model, groups, learning_rate=5e-2)
    results = await asyncio.gather(*inflight, return_exceptions=True)
    new = await greedy(model, "agent", tokens=150)
    assert new != old
    assert not [r for r in results if isinstance(r, BaseException)]
    assert all(r in (old, new) for r in results)
    assert results.count(old) >= 1  # these ran while the trainer stepped and published


async def test_unknown_model_names_answer_404(backend: LocalBackend, tiny_model_dir: Path) -> None:
    model = await registered(backend, tiny_model_dir)
    for name in ("stranger", "agent@7"):
        with pytest.raises(openai.NotFoundError, match=name):
            await greedy(model, name, tokens=1)


async def test_models_lists_kept_steps_after_a_restart(
    tmp_path: Path, tiny_model_dir: Path, sort_groups: Any
) -> None:
    """Kept checkpoints are served (loaded on demand), so /v1/models lists them, also before they are asked for."""
    first = LocalBackend(str(tmp_path / "art"), device="cpu", engine="hf")
    model = await registered(first, tiny_model_dir)
    for _ in range(4):
        await first.train(model, sort_groups(1), learning_rate=1e-2)
    await model.log(metrics={"reward": 1.0}, split="val", step=1)
    assert await model.delete_checkpoints() == [1, 4]
    await first.close()

    again = LocalBackend(str(tmp_path / "art"), device="cpu", engine="hf")
    try:
        model = await registered(again, tiny_model_dir)
        listed = {m.id for m in (await model.openai_client().models.list()).data}
        assert listed == {"agent", "agent@1", "agent@4"}
        answer = await model.openai_client().chat.completions.create(
            model="agent@1", messages=PROMPT, max_tokens=2
        )
        assert answer.choices
    finally:
        await again.close()


@pytest.mark.parametrize(
    ("flags", "dtype", "served"),
    [
        ("amx_bf16 avx512_bf16", "float32", "torch.float32"),  # auto would be bf16 on this CPU
        ("", "bfloat16", "torch.bfloat16"),  # auto would be fp32 on this one
        ("amx_bf16 avx512_bf16", "auto", "torch.bfloat16"),
    ],
)
async def test_the_sampler_computes_in_the_dtype_the_trainer_config_names(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, flags: str, dtype: str, served: str
) -> None:
    """``TrainerConfig(dtype=...)`` sets the transformers engine's dtype too: no bf16 sampling for an fp32 trainer."""
    from art_local import cpu_features
    from art_local.training import TrainerConfig

    monkeypatch.setenv(cpu_features.FLAGS_ENV, flags)
    cpu_features.cpu_flags.cache_clear()
    config = TrainerConfig(lora_rank=4, dtype=dtype)  # type: ignore[arg-type]
    backend = LocalBackend(str(tmp_path / "art"), device="cpu", engine="hf", trainer_config=config)
    try:
        model = await registered(backend, tiny_model_dir)
        assert engine_of(backend).describe()["dtype"] == served
        assert str(backend._slots[model.name].components.compute_dtype) == served  # type: ignore[union-attr]
        if dtype == "float32":
            assert agreement(backend, model, await sampled_groups(model)) < 1e-4
    finally:
        await backend.close()
        cpu_features.cpu_flags.cache_clear()


async def test_a_failed_publish_names_its_cause_keeps_the_step_and_the_next_step_is_served(
    backend: LocalBackend, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step and its publish run in one trainer job: a publish that fails surfaces, the step still counts, the
    checkpoint is on disk, requests keep the last published step, and the next train() serves its own."""
    model = await registered(backend, tiny_model_dir)
    before = await greedy(model, "agent")
    engine = engine_of(backend)
    publish = engine.publish_sync

    def broken(name: str, step: int, weights: Any) -> None:
        raise RuntimeError(f"out of memory while serving step {step}")

    monkeypatch.setattr(engine, "publish_sync", broken)
    with pytest.raises(RuntimeError, match="serving step 1"):
        await backend.train(model, await sampled_groups(model), learning_rate=5e-2)
    assert await backend._get_step(model) == 1
    assert (model.output_dir() / "checkpoints" / "0001" / "metadata.json").is_file()
    assert await greedy(model, "agent") == before  # still step 0's weights, whole
    monkeypatch.setattr(engine, "publish_sync", publish)
    result = await backend.train(model, await sampled_groups(model), learning_rate=5e-2)
    assert result.step == 2 and result.metrics["time/step_publish_s"] > 0
    assert engine.describe()["models"]["agent"]["latest"] == 2
    assert await greedy(model, "agent") != before

"""TinkerBackend.train_sft(): cross-entropy through the real SDK and loopback server, the same loss as local."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinker_harness import Server, rollout_groups

import art_core as art
from art_tinker import TinkerBackend

PAIRS = [("c a b", "abc"), ("f d e", "def"), ("j h i", "hij"), ("b a d", "abd"), ("g e f", "efg")]


def _data() -> list[art.Trajectory]:
    tool = {"type": "function", "function": {"name": "sort", "parameters": {"type": "object"}}}
    return [
        art.Trajectory(
            messages_and_choices=[
                {"role": "user", "content": f"Sort these letters: {letters}"},
                {"role": "assistant", "content": answer},
            ],
            tools=[tool] if index % 2 else None,
        )
        for index, (letters, answer) in enumerate(PAIRS)
    ]


def _model(base_path: Path, tiny_model: str, name: str = "sft") -> art.TrainableModel:
    return art.TrainableModel(
        name=name, project="sft", base_model=tiny_model, base_path=str(base_path), report_metrics=[]
    )


async def test_the_same_data_gives_the_same_first_step_loss_as_local(
    server: Server, tiny_model: str, tmp_path: Path
) -> None:
    from art_local.backend import LocalBackend

    tinker_backend = TinkerBackend(api_key=server.api_key, base_url=server.base_url, lora_rank=4)
    local_backend = LocalBackend(path=str(tmp_path / "local"), device="cpu")
    tinker_model, local_model = (
        _model(tmp_path / "tinker", tiny_model),
        _model(tmp_path / "local", tiny_model),
    )
    try:
        await tinker_model.register(tinker_backend)
        await local_backend.register(local_model)
        options = {"learning_rate": 1e-3, "batch_size": 2, "epochs": 1}
        via_tinker = await tinker_backend.train_sft(tinker_model, _data(), **options)
        via_local = await local_backend.train_sft(local_model, _data(), save_checkpoint=False, **options)
    finally:
        await tinker_backend.close()
        await local_backend.close()
    for key in ("data/sft_trained_tokens", "data/sft_examples", "data/step_num_gradient_steps"):
        assert via_tinker.metrics[key] == via_local.metrics[key], key
    first_tinker, first_local = (
        via_tinker.metrics["loss/sft_first_batch"],
        via_local.metrics["loss/sft_first_batch"],
    )
    assert first_tinker > 1.0 and first_tinker == pytest.approx(first_local, abs=1e-4)


async def test_sft_step_is_saved_served_resumed_and_rl_continues_from_it(
    server: Server, tiny_model: str, tmp_path: Path
) -> None:
    backend = TinkerBackend(api_key=server.api_key, base_url=server.base_url, lora_rank=4)
    model = _model(tmp_path, tiny_model)
    try:
        await model.register(backend)
        result = await backend.train_sft(model, _data() * 4, learning_rate=2e-2, batch_size=4, epochs=2)
        assert isinstance(result, art.TinkerTrainResult) and result.step == 1 == await model.get_step()
        assert result.metrics["loss/sft_last_batch"] < result.metrics["loss/sft_first_batch"]
        assert result.state_path is not None and result.state_path.endswith("/weights/step-000001")
        client = model.openai_client()
        reply = await client.chat.completions.create(
            model=model.get_inference_name(1),
            messages=[{"role": "user", "content": "Sort these letters: c a b"}],
            max_tokens=4,
        )
        assert reply.choices[0].message is not None
        with pytest.raises(ValueError, match="train_mlp, train_attn and train_unembed are all False"):
            await backend.train_sft(model, _data(), train_mlp=False, train_attn=False)
    finally:
        await backend.close()
    fresh = TinkerBackend(api_key=server.api_key, base_url=server.base_url, lora_rank=4)
    again = _model(tmp_path, tiny_model)
    try:
        await again.register(fresh)
        assert await again.get_step() == 1
        groups = await rollout_groups(again, ["Sort these letters: c a b"])
        rl = await fresh.train(again, groups, learning_rate=1e-3)
        assert rl.step == 2
    finally:
        await fresh.close()

"""LocalBackend.train_sft(): held-out loss drops, the step is a checkpoint RL resumes from and the server serves."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import art_core as art
from art_core.sft import sft_conversations
from art_core.testing.sft_conformance import SFTChecks
from art_local.backend import LocalBackend
from art_local.demo.task import answer, messages, split_triples
from art_local.training import TrainerConfig, get_weights
from art_local.training.sft import evaluate_sft_loss, sft_examples


def sort_trajectories(triples: list[Any]) -> list[art.Trajectory]:
    """The sort task with its *correct* answers: something the untrained tiny model cannot do."""
    return [
        art.Trajectory(messages_and_choices=[*messages(t), {"role": "assistant", "content": answer(t)}])
        for t in triples
    ]


def held_out_loss(backend: LocalBackend, model: art.TrainableModel, data: list[art.Trajectory]) -> float:
    slot = backend._slots[model.name]
    examples = sft_examples(sft_conversations(data, "all"), slot.tokenizer, max_sequence_length=2048)
    assert slot.components is not None
    return evaluate_sft_loss(slot.components, examples)


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(str(tmp_path / "art"), device="cpu")
    yield local
    await local.close()


async def _model(backend: LocalBackend, tiny_model_dir: Path, name: str = "m") -> art.TrainableModel:
    model = art.TrainableModel(name=name, project="p", base_model=str(tiny_model_dir))
    await model.register(backend)
    return model


@pytest.fixture
async def full_backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(str(tmp_path / "art"), device="cpu", trainer_config=TrainerConfig(lora_rank=None))
    yield local
    await local.close()


async def test_sft_lowers_held_out_loss_and_its_step_is_served_and_resumed_by_rl(
    full_backend: LocalBackend, tiny_model_dir: Path, make_choice: Any
) -> None:
    backend = full_backend
    train, val = split_triples()
    model = await _model(backend, tiny_model_dir)
    held_out = sort_trajectories(val[:32])
    before = held_out_loss(backend, model, held_out)
    result = await backend.train_sft(
        model, sort_trajectories(train[:128]), learning_rate=3e-3, epochs=4, batch_size=16, warmup_ratio=0.1
    )
    after = held_out_loss(backend, model, held_out)
    assert before > 6.0 and after < before - 2.5, (before, after)  # measured: 7.05 -> 3.56
    assert isinstance(result, art.LocalTrainResult) and result.step == 1 and await model.get_step() == 1
    metrics = result.metrics
    assert metrics["data/sft_examples"] == 128 and metrics["data/step_num_gradient_steps"] == 32
    assert metrics["data/sft_trained_tokens"] >= 128 * 4 * 2  # the answer's tokens + end of turn, each epoch
    assert metrics["loss/sft_last_batch"] < metrics["loss/sft_first_batch"] - 1.0
    assert math.isfinite(metrics["loss/sft"]) and metrics["loss/learning_rate"] == 3e-3
    assert result.checkpoint_path is not None and (Path(result.checkpoint_path) / "metadata.json").is_file()
    await model.log(metrics=metrics, split="train", step=result.step)

    client = model.openai_client()
    reply = await client.chat.completions.create(
        model=model.get_inference_name(1), messages=messages(val[0]), max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None
    group = art.TrajectoryGroup(
        [
            art.Trajectory(messages_and_choices=[*messages(val[0]), make_choice(text)], reward=reward)
            for text, reward in ((answer(val[0]), 1.0), ("zzz", 0.0))
        ]
    )
    rl = await backend.train(model, [group], learning_rate=1e-3)
    assert rl.step == 2 and sorted(p.name for p in (model.output_dir() / "checkpoints").iterdir()) == [
        "0001",
        "0002",
    ]


async def test_a_fresh_backend_resumes_at_the_sft_step_with_its_weights(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    train, _ = split_triples()
    first = LocalBackend(str(tmp_path / "art"), device="cpu", trainer_config=TrainerConfig(lora_rank=None))
    model = await _model(first, tiny_model_dir)
    await first.train_sft(model, sort_trajectories(train[:16]), learning_rate=1e-3, batch_size=8)
    trained = get_weights(first._slots[model.name].components)
    await first.close()  # what a killed run leaves is the last complete checkpoint: this one
    second = LocalBackend(str(tmp_path / "art"), device="cpu", trainer_config=TrainerConfig(lora_rank=None))
    try:
        again = await _model(second, tiny_model_dir)
        assert await again.get_step() == 1
        resumed = get_weights(second._slots[again.name].components)
        assert resumed.keys() == trained.keys() and all(torch.equal(resumed[k], trained[k]) for k in trained)
        state = second._slots[again.name].state
        assert state.weight_version == 2  # two optimizer steps inside the one SFT step
    finally:
        await second.close()


async def test_last_turn_tools_and_choices(
    backend: LocalBackend, tiny_model_dir: Path, make_choice: Any
) -> None:
    model = await _model(backend, tiny_model_dir)
    turns = [
        {"role": "user", "content": "Sort these letters: c b a"},
        make_choice("abc"),  # a sampled Choice is a target like a dict message; its logprobs are not needed
        {"role": "user", "content": "again: f e d"},
        {"role": "assistant", "content": "def"},
    ]
    conversation = art.Trajectory(messages_and_choices=turns)
    all_turns = await backend.train_sft(model, [conversation], save_checkpoint=False)
    last = await backend.train_sft(model, [conversation], assistant_turns="last", save_checkpoint=False)
    assert all_turns.metrics["data/sft_trained_tokens"] > last.metrics["data/sft_trained_tokens"] > 0
    assert all_turns.checkpoint_path is None and last.step == 2
    tool = {"type": "function", "function": {"name": "sort", "parameters": {"type": "object"}}}
    slot = backend._slots[model.name]
    with_tools = sft_conversations([art.Trajectory(messages_and_choices=turns, tools=[tool])], "all")
    plain, tooled = (
        sft_examples(sft_conversations([conversation], "all"), slot.tokenizer, max_sequence_length=2048),
        sft_examples(with_tools, slot.tokenizer, max_sequence_length=2048),
    )
    assert len(tooled[0][0]) > len(plain[0][0])  # the tool schema is rendered into the context
    assert sum(tooled[0][1]) == sum(plain[0][1])


async def test_bad_options_and_data_name_the_value(backend: LocalBackend, tiny_model_dir: Path) -> None:
    model = await _model(backend, tiny_model_dir)
    data = sort_trajectories(split_triples()[0][:2])
    for options, text in (
        ({"learning_rate": -1.0}, "learning_rate=-1.0"),
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": 2.5}, "batch_size=2.5"),
        ({"assistant_turns": "first"}, "assistant_turns='first'"),
        ({"schedule": "linear"}, "schedule='linear'"),
        ({"warmup_ratio": 1.0}, "warmup_ratio=1.0"),
    ):
        with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(".", r"\.")):
            await backend.train_sft(model, data, **options)
    with pytest.raises(ValueError, match="trajectory 1 has no assistant turn"):
        await backend.train_sft(
            model, [data[0], art.Trajectory(messages_and_choices=messages(("a", "b", "c")))]
        )
    with pytest.raises(ValueError, match="got no trajectories"):
        await backend.train_sft(model, [])
    with pytest.raises(TypeError, match="trajectory 0 is a dict"):
        await backend.train_sft(model, [{"messages": []}])  # type: ignore[list-item]
    assert await model.get_step() == 0  # nothing trained, nothing written


class TestLocalBackendSFTConformance(SFTChecks):
    """The kit's SFT checks on LocalBackend (its other checks run in test_backend_train.py)."""

    supports_sft = True

    @pytest.fixture
    def backend(self, tmp_path: Path) -> LocalBackend:
        return LocalBackend(str(tmp_path / "conformance"), device="cpu")

    @pytest.fixture
    def base_model(self, tiny_model_dir: Path) -> str:
        return str(tiny_model_dir)

    @pytest.fixture
    def fresh_backend(self, tmp_path: Path) -> Callable[[], LocalBackend]:
        return lambda: LocalBackend(str(tmp_path / "conformance"), device="cpu")


async def test_train_devices_sft_matches_one_process_and_rl_resumes_on_the_workers(
    tmp_path: Path, tiny_model_dir: Path, make_choice: Any
) -> None:
    """Two gloo worker processes (torchrun) take the same SFT steps as one process: loss, weights, checkpoint."""
    from safetensors.torch import load_file

    from art_local.distributed import DistributedConfig

    two_gloo = DistributedConfig(
        nproc_per_node=2, device="cpu", start_timeout_s=240, request_timeout_s=150, collective_timeout_s=120
    )
    config = TrainerConfig(lora_rank=4, max_sequence_length=48, micro_batch_rows=1)
    data = sort_trajectories(split_triples()[0][:12])
    multi = LocalBackend(str(tmp_path / "multi"), device="cpu", trainer_config=config, train_devices=two_gloo)
    single = LocalBackend(str(tmp_path / "single"), device="cpu", trainer_config=config)
    model = art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir))
    twin = art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir))
    try:
        await model.register(multi)
        await single.register(twin)
        options: dict[str, Any] = {"learning_rate": 1e-2, "batch_size": 4, "epochs": 2, "warmup_ratio": 0.2}
        result = await multi.train_sft(model, data, **options)
        expected = await single.train_sft(twin, data, **options)
        assert result.step == expected.step == 1 and result.checkpoint_path and expected.checkpoint_path
        for key in ("loss/sft", "loss/sft_first_batch", "loss/sft_last_batch", "data/sft_trained_tokens"):
            assert result.metrics[key] == pytest.approx(expected.metrics[key], rel=1e-4), key
        files = sorted(p.name for p in Path(expected.checkpoint_path).glob("*.safetensors"))
        assert files and files == sorted(p.name for p in Path(result.checkpoint_path).glob("*.safetensors"))
        for name in files:
            a, b = (load_file(Path(d) / name) for d in (result.checkpoint_path, expected.checkpoint_path))
            assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name
        group = art.TrajectoryGroup(
            art.Trajectory(messages_and_choices=[*messages(t), make_choice(text)], reward=reward)
            for t, text, reward in ((("c", "a", "b"), "abc", 1.0), (("c", "a", "b"), "cab", 0.0))
        )
        assert (await multi.train(model, [group], learning_rate=1e-3)).step == 2
    finally:
        await multi.close()
        await single.close()


async def test_a_jsonl_file_with_tools_and_tool_calls_trains_the_calls(
    backend: LocalBackend, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import json

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "3 degrees"},
            {"role": "assistant", "content": "3 degrees"},
        ],
        "tools": [tool],
    }
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    model = await _model(backend, tiny_model_dir)
    data = list(art.read_sft_jsonl(path))
    result = await backend.train_sft(model, data, batch_size=2, save_checkpoint=False)
    assert result.step == 1 and result.metrics["data/sft_examples"] == 2
    tokenizer = backend._slots[model.name].tokenizer
    ((tokens, trained),) = sft_examples(
        sft_conversations(data[:1], "all"), tokenizer, max_sequence_length=2048
    )
    targets = tokenizer.decode([t for t, flag in zip(tokens, trained, strict=True) if flag])
    context = tokenizer.decode([t for t, flag in zip(tokens, trained, strict=True) if not flag])
    assert "get_weather" in targets and "Oslo" in targets and "3 degrees" in targets  # both assistant turns
    assert "get_weather" in context  # the tool schema is in the prompt too

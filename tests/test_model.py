"""Model / TrainableModel: names, registration, endpoint, inference names, delete_checkpoints."""

from __future__ import annotations

import json
import warnings

import pytest
from core_support import MemoryBackend

import art_core as art


@pytest.mark.parametrize(
    "bad",
    ["a/b", "a\\b", "..", "x..y", "nul\x00", "", " padded", "x" * 129, "."],
)
def test_path_like_names_are_refused(bad: str, base_path: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        art.Model(name=bad, project="p", base_path=base_path)
    with pytest.raises(ValueError, match="project name"):
        art.Model(name="ok", project=bad, base_path=base_path)


def test_good_names_and_output_dir(base_path: str) -> None:
    m = art.TrainableModel(
        name="agent-001.v2_x", project="demo", base_model="Qwen/Qwen3-0.6B", base_path=base_path
    )
    assert m.output_dir().parts[-3:] == ("demo", "models", "agent-001.v2_x")
    assert m.trainable and m.base_model == "Qwen/Qwen3-0.6B"


async def test_register_sets_the_endpoint_and_is_idempotent(
    memory_backend: MemoryBackend, base_path: str
) -> None:
    m = art.TrainableModel(name="m", project="p", base_model="base", base_path=base_path)
    with pytest.raises(ValueError, match="register"):
        m.openai_client()
    await m.register(memory_backend)
    await m.register(memory_backend)
    assert m.inference_base_url == "http://127.0.0.1:9/v1" and m.inference_api_key == "test-key"
    client = m.openai_client()
    assert str(client.base_url).startswith("http://127.0.0.1:9/v1") and client.api_key == "test-key"
    assert m.openai_client() is client
    assert client.timeout == art.model.DEFAULT_REQUEST_TIMEOUT_S == 180.0 and client.max_retries == 1
    patient = m.openai_client(timeout_s=900, max_retries=0)
    assert patient.timeout == 900 and patient.max_retries == 0 and patient is not client
    with pytest.raises(ValueError, match="timeout_s=0"):
        m.openai_client(timeout_s=0)
    with pytest.raises(ValueError, match="already registered with MemoryBackend"):
        await m.register(MemoryBackend())


async def test_inference_names_and_steps(memory_backend: MemoryBackend, base_path: str) -> None:
    m = art.TrainableModel(name="m", project="p", base_model="base", base_path=base_path)
    assert m.get_inference_name() == "m" and m.get_inference_name(3) == "m@3"  # before registration
    await m.register(memory_backend)
    memory_backend.advance(m, 4)
    assert await m.get_step() == 4
    assert m.get_inference_name(2) == "m@2"
    assert await art.Model(name="plain", project="p").get_step() == 0


async def test_log_uses_the_backend_step_by_default(memory_backend: MemoryBackend, base_path: str) -> None:
    m = art.TrainableModel(name="m", project="p", base_model="base", base_path=base_path, report_metrics=[])
    await m.register(memory_backend)
    memory_backend.advance(m, 7)
    await m.log(metrics={"a": 1.0})
    assert json.loads((m.output_dir() / "history.jsonl").read_text())["step"] == 7


async def _history_model(memory_backend: MemoryBackend, base_path: str) -> art.TrainableModel:
    m = art.TrainableModel(name="m", project="p", base_model="base", base_path=base_path, report_metrics=[])
    await m.register(memory_backend)
    for step in range(1, 8):
        memory_backend.advance(m, step)
    return m


async def test_delete_checkpoints_keeps_latest_and_best(
    memory_backend: MemoryBackend, base_path: str
) -> None:
    m = await _history_model(memory_backend, base_path)
    for step in range(1, 8):
        await m.log(metrics={"loss/train": 1.0}, step=step)
    await m.log(metrics={"reward": 0.2}, split="val", step=2)
    await m.log(metrics={"reward": 0.9}, split="val", step=3)  # best, first seen long after line 1
    await m.log(metrics={"reward": 0.4}, split="val", step=3)  # same step twice: mean 0.65 still best
    await m.log(metrics={"reward": 0.5}, split="val", step=6)
    kept = await m.delete_checkpoints()
    assert kept == [3, 7] and memory_backend.kept["m"] == [3, 7]
    assert memory_backend.checkpoints["m"] == {3, 7}


async def test_delete_checkpoints_lower_is_better(memory_backend: MemoryBackend, base_path: str) -> None:
    m = await _history_model(memory_backend, base_path)
    for step, loss in [(1, 0.5), (2, 0.1), (5, 0.3)]:
        await m.log(metrics={"loss/train": loss}, step=step)
    assert await m.delete_checkpoints("loss/train", higher_is_better=False) == [2, 7]


async def test_missing_history_or_metric_keeps_the_latest_and_warns(
    memory_backend: MemoryBackend, base_path: str
) -> None:
    m = await _history_model(memory_backend, base_path)
    with pytest.warns(RuntimeWarning, match="no history"):
        assert await m.delete_checkpoints() == [7]
    await m.log(metrics={"loss/train": 1.0}, step=1)
    with pytest.warns(RuntimeWarning, match="no 'val/reward'"):
        assert await m.delete_checkpoints() == [7]
    assert memory_backend.checkpoints["m"] == {7}


async def test_a_misspelled_metric_deletes_nothing(memory_backend: MemoryBackend, base_path: str) -> None:
    m = await _history_model(memory_backend, base_path)
    await m.log(metrics={"reward": 0.9}, split="val", step=2)
    with pytest.raises(ValueError, match="did you mean 'val/reward'"):
        await m.delete_checkpoints("val/rewad")
    assert memory_backend.checkpoints["m"] == set(range(8))


async def test_delete_checkpoints_reads_past_a_corrupt_line(
    memory_backend: MemoryBackend, base_path: str
) -> None:
    m = await _history_model(memory_backend, base_path)
    await m.log(metrics={"reward": 0.3}, split="val", step=2)
    with open(m.output_dir() / "history.jsonl", "a") as handle:
        handle.write("garbage\n")
    await m.log(metrics={"reward": 0.8}, split="val", step=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert await m.delete_checkpoints() == [4, 7]

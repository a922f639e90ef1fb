"""Memory: activation checkpointing keeps the maths and lowers the peak, logits stay chunk-sized, and
``plan_memory`` refuses what the device cannot hold before anything loads."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

import art_core as art
from art_local.backend import LocalBackend
from art_local.training import StepConfig, TrainerConfig, build_components, forward_backward
from art_local.training.logprobs import causal_lm
from art_local.training.measure_memory import save_random_model, synthetic_batch
from art_local.training.memory import MemoryPlanError, check_memory_fits, plan_memory
from art_local.training.state import uses_activation_checkpointing


def test_activation_checkpointing_must_be_a_bool_or_auto() -> None:
    with pytest.raises(ValueError, match=r"activation_checkpointing='yes' must be True, False or 'auto'"):
        TrainerConfig(activation_checkpointing="yes")  # type: ignore[arg-type]


def test_chunk_size_is_a_per_call_option_and_checkpointing_a_static_one() -> None:
    assert "logprob_calculation_chunk_size" not in TrainerConfig().fingerprint_fields()
    assert StepConfig(logprob_calculation_chunk_size=64).logprob_calculation_chunk_size == 64
    # how the steps run, not what a checkpoint means: following the memory plan's advice still resumes
    assert TrainerConfig(activation_checkpointing=True).fingerprint() == TrainerConfig().fingerprint()


def test_auto_checkpointing_is_on_for_large_models_on_cuda_only() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_activation_checkpointing("auto", cuda, 1_500_000_000)
    assert not uses_activation_checkpointing("auto", cuda, 500_000_000)
    assert not uses_activation_checkpointing("auto", cpu, 7_000_000_000)
    assert uses_activation_checkpointing(True, cpu, 1000)
    assert not uses_activation_checkpointing(False, cuda, 7_000_000_000)


@pytest.mark.parametrize("lora_rank", [8, None], ids=["lora", "full"])
def test_gradients_with_activation_checkpointing_equal_those_without(
    tiny_model_dir: Path, lora_rank: int | None
) -> None:
    grads = {}
    for checkpointing in (False, True):
        config = TrainerConfig(lora_rank=lora_rank, activation_checkpointing=checkpointing)
        components = build_components(tiny_model_dir, config, device="cpu")
        lm: Any = causal_lm(components.model)
        assert lm.is_activation_checkpointing is checkpointing
        generator = torch.Generator().manual_seed(2)
        for name, parameter in components.model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would leave every lora_A gradient zero
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
        batch = synthetic_batch(2, 48, int(lm.config.vocab_size), seed=1)
        forward_backward(components, batch)
        grads[checkpointing] = {
            name: parameter.grad.clone()
            for name, parameter in components.model.named_parameters()
            if parameter.grad is not None
        }
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, without in grads[False].items():
        assert without.abs().sum() > 0, name
        torch.testing.assert_close(grads[True][name], without, atol=1e-5, rtol=0, msg=name)


def _measure(
    model_dir: Path,
    rows: int,
    sequence_length: int,
    config: dict[str, Any],
    step: dict[str, Any] | None = None,
) -> dict[str, Any]:
    request = {
        "step": step or {},
        "model_dir": str(model_dir),
        "rows": rows,
        "sequence_length": sequence_length,
        "optimizer_step": False,
        "trainer_config": config,
    }
    completed = subprocess.run(
        [sys.executable, "-m", "art_local.training.measure_memory", json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["peak_reset"], "the peak counter could not be reset; the figures would include loading"
    return result


def held_for_backward_bytes(components: Any, batch: Any, config: TrainerConfig) -> int:
    """Bytes of the tensors autograd holds for the backward when it starts (what checkpointing cuts).

    Counted through saved-tensor hooks: everything packed before the first unpack. Inside a checkpointed
    region torch installs its own hooks (it keeps only the region's inputs), so those are not counted.
    """
    held, backward_started = 0, False

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal held
        if not backward_started:
            held += tensor.numel() * tensor.element_size()
        return tensor

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal backward_started
        backward_started = True
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        forward_backward(components, batch)
    return held


@pytest.mark.parametrize("lora_rank", [8, None], ids=["lora", "full"])
def test_activation_checkpointing_holds_a_fraction_of_the_activations(
    tmp_path: Path, lora_rank: int | None
) -> None:
    """Deterministic, unlike RSS on a shared machine (bench/memory.py measures the RSS peaks)."""
    model_dir = save_random_model(
        tmp_path / "deep",
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=10,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    )
    held = {}
    for checkpointing in (False, True):
        config = TrainerConfig(
            lora_rank=lora_rank, activation_checkpointing=checkpointing, memory_check=False
        )
        components = build_components(model_dir, config, device="cpu")
        held[checkpointing] = held_for_backward_bytes(
            components, synthetic_batch(1, 256, 1024, seed=1), config
        )
    # ten layers: only each layer's input stays (plus the logits chunk's inputs), not its internals
    assert held[True] < held[False] / 3, held


@pytest.mark.slow
def test_a_150k_vocabulary_peaks_with_the_chunk_not_the_sequence(tmp_path: Path) -> None:
    vocab, sequence, chunk = 150_000, 4096, 128
    model_dir = save_random_model(
        tmp_path / "wide-vocab",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=vocab,
        max_position_embeddings=sequence,
    )
    config = {"lora_rank": 8, "activation_checkpointing": False}
    result = _measure(model_dir, 1, sequence, config, step={"logprob_calculation_chunk_size": chunk})
    full_logits = sequence * vocab * 4  # 2.3 GiB of fp32 logits if the sequence went through at once
    # 73 MiB; a few copies of it (logits, softmax, gradient) are alive at once
    chunk_logits = chunk * vocab * 4
    assert result["step_growth_bytes"] < full_logits / 4, (result, full_logits)
    assert result["step_growth_bytes"] < 8 * chunk_logits, (result, chunk_logits)


def test_register_refuses_a_model_the_device_cannot_hold(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainerConfig(max_sequence_length=4096, activation_checkpointing=False)
    needed = plan_memory(
        tiny_model_dir, sequence_length=4096, batch_rows=1, trainer_config=config, device="cpu"
    )
    relieved = plan_memory(
        tiny_model_dir,
        sequence_length=4096,
        batch_rows=1,
        trainer_config=TrainerConfig(activation_checkpointing=True),
        step=StepConfig(logprob_calculation_chunk_size=256),
        device="cpu",
    )
    assert relieved.total_bytes < needed.total_bytes
    fake_free = (relieved.total_bytes + needed.total_bytes) // 2
    with pytest.raises(MemoryPlanError) as refused:
        check_memory_fits(tiny_model_dir, config, device="cpu", available_bytes=fake_free)
    message = str(refused.value)
    assert f"needs about {needed.describe()}" in message
    assert f"{fake_free / 1024**3:.2f} GiB is available" in message
    assert "options that would fit" in message and "memory_check=False" in message

    monkeypatch.setattr("art_local.training.memory.available_memory", lambda device=None: fake_free)
    backend = LocalBackend(str(tmp_path / "art"), device="cpu", trainer_config=config)
    with pytest.raises(MemoryPlanError, match="options that would fit"):
        await_register(backend, art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir)))
    unchecked = LocalBackend(
        str(tmp_path / "art2"),
        device="cpu",
        trainer_config=TrainerConfig(max_sequence_length=4096, memory_check=False),
    )
    await_register(unchecked, art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir)))


def await_register(backend: LocalBackend, model: art.TrainableModel) -> None:
    import asyncio

    async def go() -> None:
        try:
            await backend.register(model)
        finally:
            await backend.close()

    asyncio.run(go())


@pytest.mark.parametrize(("strategy", "lora_rank"), [("ddp", 4), ("fsdp", None)])
def test_the_torchrun_path_checkpoints_activations_with_the_same_step(
    tiny_model_dir: Path, strategy: Literal["ddp", "fsdp"], lora_rank: int | None
) -> None:
    """A world of one (gloo, this process) builds through build_components: checkpointing on, same step."""
    import socket

    import torch.distributed as dist

    from art_local.distributed.protocol import SetupRequest
    from art_local.distributed.worker import Rank, _setup
    from art_local.training import TrainingState, optim_step, train_step

    config = TrainerConfig(lora_rank=lora_rank, activation_checkpointing=True)
    batch = synthetic_batch(2, 40, 1024, seed=3)
    reference = build_components(tiny_model_dir, dataclasses.replace(config, activation_checkpointing=False))
    metrics = forward_backward(reference, batch)
    expected = optim_step(reference, TrainingState(), learning_rate=1e-2, tokens=batch.num_trained_tokens)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        me = Rank(0, 1, torch.device("cpu"), dist.new_group(backend="gloo"), child, 30.0, 0.05)
        parallel, _ = _setup(me, SetupRequest(str(tiny_model_dir), config, strategy))
        lm: Any = causal_lm(parallel.components.model)
        assert lm.is_activation_checkpointing
        state, got = train_step(parallel, TrainingState(), batch, StepConfig(), learning_rate=1e-2)
    finally:
        parent.close()
        child.close()
        dist.destroy_process_group()
    assert state.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
    assert got["loss/train"] == pytest.approx(metrics["loss/train"], rel=1e-5, abs=1e-9)


def test_a_model_that_cannot_be_planned_trains_unchecked_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="could not estimate the training memory"):
        assert check_memory_fits(tmp_path, TrainerConfig(), device="cpu", available_bytes=0) is None


@pytest.mark.gpu
def test_on_cuda_checkpointing_lowers_max_memory_allocated_and_the_plan_fits(tmp_path: Path) -> None:
    model_dir = save_random_model(
        tmp_path / "gpu",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    peaks, planned = {}, {}
    for checkpointing in (False, True):
        config = TrainerConfig(lora_rank=8, activation_checkpointing=checkpointing)
        components = build_components(model_dir, config, device="cuda")
        batch = synthetic_batch(2, 2048, 32000).to("cuda")
        torch.cuda.reset_peak_memory_stats()
        forward_backward(components, batch)
        peaks[checkpointing] = torch.cuda.max_memory_allocated()
        planned[checkpointing] = plan_memory(
            model_dir, sequence_length=2048, batch_rows=2, trainer_config=config, device="cuda"
        ).total_bytes
        del components
        torch.cuda.empty_cache()
    assert peaks[True] < 0.6 * peaks[False], peaks
    assert all(peaks[key] <= planned[key] for key in peaks), (peaks, planned)

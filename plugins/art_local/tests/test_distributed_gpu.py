"""LocalBackend(train_devices=...) on CUDA with NCCL: DDP and FSDP2 on every visible GPU against one process.

Skipped without CUDA (conftest). Uses the ``small`` tiny model (17.8M) with LoRA in bf16 (the "auto" dtype on
CUDA), compares the weights after the same train() calls with a one-process backend on cuda:0, and prints the
trained tokens per second per GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import art_core as art
from art_local.backend import LocalBackend
from art_local.distributed import DistributedConfig
from art_local.training import TrainerConfig

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(900)]

Groups = Callable[..., list[Any]]


def adapter(directory: str | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    assert directory is not None
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
async def test_nccl_workers_on_every_gpu_match_one_process_and_report_throughput(
    tmp_path: Path, sort_groups: Groups, strategy: str
) -> None:
    from art_local.tiny import build_tiny_model

    gpus = torch.cuda.device_count()
    base = str(build_tiny_model("small"))
    config = TrainerConfig(lora_rank=8, max_sequence_length=64)
    workers = DistributedConfig(
        nproc_per_node=gpus,
        strategy=strategy,  # type: ignore[arg-type]
        device="cuda",
        start_timeout_s=600,
        request_timeout_s=600,
        collective_timeout_s=300,
    )
    multi = LocalBackend(str(tmp_path / "multi"), trainer_config=config, train_devices=workers)
    single = LocalBackend(str(tmp_path / "single"), device="cuda:0", trainer_config=config)
    model = art.TrainableModel(name="g", project="p", base_model=base)
    twin = art.TrainableModel(name="g", project="p", base_model=base)
    try:
        await multi.register(model)  # register only: no inference server competing for the GPUs
        await single.register(twin)
        first = await single.train(twin, sort_groups(4), learning_rate=1e-3)
        start = adapter(first.checkpoint_path)
        await multi.train(model, sort_groups(4), learning_rate=1e-3)
        result = await multi.train(model, sort_groups(4, rewards=(0.0, 1.0, 0.5, 0.0)), learning_rate=1e-3)
        expected = await single.train(twin, sort_groups(4, rewards=(0.0, 1.0, 0.5, 0.0)), learning_rate=1e-3)
        got, want = adapter(result.checkpoint_path), adapter(expected.checkpoint_path)
        update = max(float((want[k].float() - start[k].float()).abs().max()) for k in want)
        gap = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
        print(
            f"\n{strategy} on {gpus} GPU(s) vs one process (bf16 autocast): max |Δweight| {gap:.3g}, update {update:.3g}"
        )
        assert update > 0 and gap < 0.1 * update  # bf16 sums in another order; far below one step's change
        assert result.metrics["loss/train"] == pytest.approx(
            expected.metrics["loss/train"], rel=0.05, abs=1e-4
        )

        groups = [group for _ in range(16) for group in sort_groups(4)]  # 64 groups, 256 completions
        started, tokens = time.perf_counter(), 0.0
        for _ in range(3):
            timed = await multi.train(model, groups, learning_rate=1e-4, save_checkpoint=False)
            tokens += timed.metrics["data/step_trainer_tokens"]
        torch.cuda.synchronize()
        per_gpu = tokens / (time.perf_counter() - started) / gpus
        print(
            f"{strategy}: {per_gpu:.0f} trained tokens/s per GPU ({gpus} GPU(s), small model, LoRA r8, bf16)"
        )
    finally:
        await multi.close()
        await single.close()

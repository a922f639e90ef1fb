"""``register`` with ``train_devices`` checks one rank's memory before it launches any worker: DDP holds the
whole model per rank, FSDP a shard of it, and CPU ranks share this machine's memory."""

from __future__ import annotations

from pathlib import Path

import pytest

import art_core as art
from art_local.backend import LocalBackend
from art_local.distributed import DistributedConfig
from art_local.training import TrainerConfig, memory
from art_local.training.memory import MemoryPlanError, check_memory_fits, plan_memory, rank_plan


def _shape() -> object:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, vocab_size=32000, num_attention_heads=8
    )


def test_a_rank_holds_all_of_it_under_ddp_and_a_shard_under_fsdp() -> None:
    config = TrainerConfig(lora_rank=None, dtype="float32")
    single = plan_memory(_shape(), sequence_length=256, batch_rows=1, trainer_config=config, device="cpu")
    ddp = rank_plan(single, _shape(), DistributedConfig(nproc_per_node=4, device="cpu"))
    fsdp = rank_plan(single, _shape(), DistributedConfig(nproc_per_node=4, strategy="fsdp", device="cpu"))
    assert ddp.weights_bytes == single.weights_bytes and ddp.gradients_bytes == 2 * single.gradients_bytes
    assert fsdp.optimizer_bytes == -(-single.optimizer_bytes // 4)
    # a quarter of the weights plus two gathered layers (an eighth each)
    assert fsdp.weights_bytes == pytest.approx(single.weights_bytes * (1 / 4 + 2 / 8), rel=1e-3)
    assert fsdp.total_bytes < single.total_bytes < ddp.total_bytes
    assert rank_plan(single, _shape(), None) == single


def test_cpu_ranks_share_the_machine_and_the_refusal_says_so() -> None:
    config = TrainerConfig(lora_rank=None, dtype="float32", max_sequence_length=256)
    one = check_memory_fits(_shape(), config, device="cpu", available_bytes=10 * memory.GIB)
    assert one is not None and one.total_bytes < 5 * memory.GIB  # one process fits in 10 GiB
    two = DistributedConfig(nproc_per_node=2, device="cpu")
    ranks = rank_plan(one, _shape(), two)
    with pytest.raises(MemoryPlanError, match=r"per rank \(2 ddp ranks share 2\.00 GiB\)") as refused:
        check_memory_fits(_shape(), config, distributed=two, available_bytes=2 * memory.GIB)
    assert "lora_rank=8" in str(refused.value)  # what would fit is still named
    fits = check_memory_fits(_shape(), config, distributed=two, available_bytes=2 * ranks.total_bytes + 1)
    assert fits == ranks


async def test_register_refuses_before_launching_workers(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from art_local.distributed import remote

    monkeypatch.setattr(memory, "available_memory", lambda device=None: 1024**2)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("workers were launched")

    monkeypatch.setattr(remote, "start_workers", never)
    backend = LocalBackend(
        str(tmp_path),
        device="cpu",
        trainer_config=TrainerConfig(max_sequence_length=64),
        train_devices=DistributedConfig(nproc_per_node=2, device="cpu"),
    )
    try:
        model = art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir))
        with pytest.raises(MemoryPlanError, match=r"per rank \(2 ddp ranks share 0\.00 GiB\)"):
            await model.register(backend)
    finally:
        await backend.close()

"""LocalBackend(train_devices=...) with two gloo worker processes on CPU against the one-process trainer.

Each test launches real torchrun worker groups (elastic agent, DDP or FSDP2, gloo) on the tiny model and checks
the weights after train() against a one-process LocalBackend given the same calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import art_core as art
from art_core.trajectories import is_choice
from art_local.backend import LocalBackend
from art_local.distributed import DistributedConfig, DistributedWorkerError
from art_local.distributed.protocol import LoadReply, LoadRequest, TrainReply, TrainRequest
from art_local.training import (
    CheckpointMismatchError,
    LossConfig,
    StepConfig,
    TrainerConfig,
    compute_logprobs,
    prepare_batch,
)
from art_local.training.step import split_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

Groups = Callable[..., list[Any]]
TOLERANCE = 1e-5


def gloo(strategy: str = "ddp") -> DistributedConfig:
    """Two CPU processes with short, test-sized timeouts."""
    return DistributedConfig(
        nproc_per_node=2,
        strategy=strategy,  # type: ignore[arg-type]
        device="cpu",
        start_timeout_s=240,
        request_timeout_s=150,
        collective_timeout_s=120,
        shutdown_timeout_s=10,
    )


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The trained weights a checkpoint holds (adapter or full model)."""
    from safetensors.torch import load_file

    name = (
        "adapter_model.safetensors"
        if (directory / "adapter_model.safetensors").exists()
        else "model.safetensors"
    )
    return load_file(str(directory / name))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key].float() - b[key].float()).abs().max()) for key in a)


def same_checkpoint(multi: Path, single: Path) -> float:
    """Same files, same metadata (up to float noise), same optimizer structure; returns the max weight gap."""
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    meta_multi, meta_single = (json.loads((d / "metadata.json").read_text()) for d in (multi, single))
    assert meta_multi.pop("grad_norm") == pytest.approx(meta_single.pop("grad_norm"), rel=1e-4)
    assert meta_multi == meta_single
    opt_multi, opt_single = (torch.load(d / "optimizer.pt", weights_only=True) for d in (multi, single))
    assert opt_multi["param_groups"] == opt_single["param_groups"]
    assert opt_multi["state"].keys() == opt_single["state"].keys()
    for index, values in opt_single["state"].items():
        assert torch.equal(values["step"], opt_multi["state"][index]["step"])
        assert torch.allclose(values["exp_avg"], opt_multi["state"][index]["exp_avg"], atol=1e-7, rtol=1e-3)
    return max_difference(checkpoint_tensors(multi), checkpoint_tensors(single))


async def sampled_groups(model: art.TrainableModel, groups: int = 2, n: int = 4) -> list[art.TrajectoryGroup]:
    """Real rollouts from the server: n Choices per prompt, reward = the choice's index."""
    result = []
    for g in range(groups):
        messages: Any = [{"role": "user", "content": f"Sort these letters: d a c ({g})"}]
        response = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=messages, n=n, max_tokens=10, logprobs=True, seed=g
        )
        trajectories = [
            art.Trajectory(
                messages_and_choices=[*messages, choice],
                reward=float(i),  # distinct rewards: every trajectory has a nonzero advantage
            )
            for i, choice in enumerate(response.choices)
        ]
        result.append(art.TrajectoryGroup(trajectories))
    return result


async def greedy(model: art.TrainableModel) -> str:
    response = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(),
        messages=[{"role": "user", "content": "Sort these letters: b a"}],
        temperature=0,
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    return response.choices[0].message.content or ""


def served_vs_trained(reference: LocalBackend, name: str, groups: list[art.TrajectoryGroup]) -> float:
    """max |server logprob − logprob under the one-process trainer's weights| over the sampled tokens."""
    slot = reference._slots[name]
    prepared = prepare_batch(groups, slot.tokenizer)
    assert prepared.batch is not None and slot.components is not None
    mask_BT = prepared.batch.loss_mask_BT
    choices = [c for g in groups for t in g.trajectories for c in t.messages_and_choices if is_choice(c)]
    sampled = sum(len(c.logprobs.content or []) for c in choices if c.logprobs is not None)
    assert int(mask_BT.sum()) == sampled
    trained = compute_logprobs(slot.components, prepared.batch)[mask_BT]
    return float((trained - prepared.batch.old_logprobs_BT[mask_BT]).abs().max())


async def test_ddp_on_two_gloo_processes_trains_serves_checkpoints_and_recovers_like_one_process(
    tmp_path: Path, tiny_model_dir: Path, sort_groups: Groups, claim_written_with: Callable[..., Path]
) -> None:
    config = TrainerConfig(lora_rank=4, max_sequence_length=48, micro_batch_rows=1)
    multi_path, single_path = tmp_path / "multi", tmp_path / "single"
    first = LocalBackend(str(multi_path), device="cpu", trainer_config=config)  # step 1 in one process
    await first.register(art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir)))
    await first.train(first._slots["m"].model, sort_groups(2), learning_rate=1e-2)
    await first.close()
    shutil.copytree(multi_path, single_path)

    backend = LocalBackend(
        str(multi_path), device="cpu", engine="hf", trainer_config=config, train_devices=gloo()
    )
    reference = LocalBackend(str(single_path), device="cpu", trainer_config=config)
    model = art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir))
    twin = art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir))
    try:
        await model.register(backend)  # a one-process checkpoint resumes in the workers
        await reference.register(twin)
        assert await backend._get_step(model) == 1 and backend._slots["m"].components is None
        groups = await sampled_groups(model)
        assert served_vs_trained(reference, "m", groups) < 1e-4  # the server got step 1's weights from rank 0
        before = await greedy(model)
        inflight = [asyncio.create_task(greedy(model)) for _ in range(3)]
        result = await backend.train(model, groups, learning_rate=1e-2, verbose=True)
        answers = await asyncio.gather(*inflight)  # the parent's loop kept serving during the step
        expected = await reference.train(twin, groups, learning_rate=1e-2)
        assert result.step == expected.step == 2 and result.checkpoint_path is not None
        for key in ("loss/train", "loss/entropy", "loss/grad_norm", "data/step_trainer_tokens"):
            assert result.metrics[key] == pytest.approx(expected.metrics[key], rel=1e-4, abs=1e-9), key
        assert set(result.metrics) == set(expected.metrics)
        gap = same_checkpoint(Path(result.checkpoint_path), single_path / "p/models/m/checkpoints/0002")
        print(f"\nDDP 2×gloo vs one process after train(): max |Δweight| = {gap:.3g}")
        assert gap < TOLERANCE
        after = await greedy(model)
        assert all(answer in (before, after) for answer in answers)
        assert served_vs_trained(reference, "m", await sampled_groups(model)) < 1e-4  # step 2 is served

        workers = backend._slots["m"].workers
        assert workers is not None
        wrong = dataclasses.replace(config, weight_decay=0.1)
        claimed = claim_written_with(wrong, Path(result.checkpoint_path), tmp_path / "claimed")
        refuse = LoadRequest(str(claimed))
        with pytest.raises(CheckpointMismatchError, match="allow_config_mismatch=True") as mismatch:
            await asyncio.to_thread(workers.call, refuse, LoadReply)  # rank 0 refuses; the group stays up
        assert "raised by trainer worker rank 0" in "".join(mismatch.value.__notes__)
        prepared = prepare_batch(sort_groups(2), reference._slots["m"].tokenizer, max_sequence_length=48)
        assert prepared.batch is not None
        rows_of_rank_1 = split_rows(prepared.batch, 2)[1]
        tokens_BT = prepared.batch.tokens_BT.clone()
        tokens_BT[rows_of_rank_1] = 10_000  # beyond the vocabulary: rank 1's embedding lookup raises
        bad_batch = dataclasses.replace(prepared.batch, tokens_BT=tokens_BT)
        state = backend._slots["m"].state
        broken = TrainRequest(state=state, batch=bad_batch, step=StepConfig(), learning_rate=1e-2)
        with pytest.raises(DistributedWorkerError) as failure:
            await asyncio.wait_for(asyncio.to_thread(workers.call, broken, TrainReply), timeout=120)
        message = str(failure.value)
        assert message.startswith("trainer worker rank 1 failed") and "IndexError" in message
        assert "Traceback (most recent call last)" in message and "embedding" in message
        with pytest.raises(DistributedWorkerError, match=r"close the backend \(await backend.close\(\)\)"):
            await backend.train(model, groups, learning_rate=1e-2)
        assert await backend._get_step(model) == 2

        await backend.close()  # then the same backend starts a fresh worker group
        await model.register(backend)
        assert await backend._get_step(model) == 2
        again = await backend.train(model, sort_groups(1), learning_rate=1e-2)
        assert again.step == 3 and again.checkpoint_path is not None
    finally:
        await backend.close()
        await reference.close()

    single_again = LocalBackend(
        str(multi_path), device="cpu", trainer_config=config
    )  # workers' checkpoint → one process
    try:
        await single_again.register(art.TrainableModel(name="m", project="p", base_model=str(tiny_model_dir)))
        assert await single_again._get_step(single_again._slots["m"].model) == 3
        from art_local.training import get_weights

        live = get_weights(single_again._slots["m"].components)  # type: ignore[arg-type]
        saved = checkpoint_tensors(Path(again.checkpoint_path))
        assert max_difference(live, saved) == 0.0
    finally:
        await single_again.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_second_node(port: int, log: Path) -> subprocess.Popen[bytes]:
    """Node rank 1 exactly as DISTRIBUTED.md tells a user to start it: plain torchrun, static rendezvous."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1"]
    command += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    command += ["-m", "art_local.distributed.worker"]
    env = {**os.environ, "ART_DISTRIBUTED_DEVICE": "cpu", "ART_DISTRIBUTED_COLLECTIVE_TIMEOUT_S": "120"}
    with open(log, "wb") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)


async def test_fsdp_on_two_nodes_full_fine_tune_with_kl_and_precalculated_logprobs_matches_one_process(
    tmp_path: Path, tiny_model_dir: Path, sort_groups: Groups, tiny_tokenizer: Any
) -> None:
    """Two "nodes" of one process each on this machine: node 0 from LocalBackend, node 1 from plain torchrun."""
    config = TrainerConfig(lora_rank=None, max_sequence_length=48)
    one_row = sort_groups(1)
    one_row_batch = prepare_batch(one_row, tiny_tokenizer, max_sequence_length=48).batch
    assert one_row_batch is not None
    assert split_rows(one_row_batch, 2)[1] == []  # one row: rank 1 only runs the zero-loss dummy row
    port = free_port()
    two_nodes = dataclasses.replace(gloo("fsdp"), nproc_per_node=1, nnodes=2, master_port=port)
    node_1 = start_second_node(port, tmp_path / "node1.log")
    backend = LocalBackend(
        str(tmp_path / "multi"), device="cpu", trainer_config=config, train_devices=two_nodes
    )
    reference = LocalBackend(str(tmp_path / "single"), device="cpu", trainer_config=config)
    model = art.TrainableModel(name="f", project="p", base_model=str(tiny_model_dir))
    twin = art.TrainableModel(name="f", project="p", base_model=str(tiny_model_dir))
    options: dict[str, Any] = {"learning_rate": 1e-3, "kl_penalty_coef": 0.5, "precalculate_logprobs": True}
    try:
        await backend.register(model)
        await reference.register(twin)
        for groups, plot in ((sort_groups(3), True), (one_row, False)):
            result = await backend.train(model, groups, plot_tensors=plot, **options)
            expected = await reference.train(twin, groups, plot_tensors=plot, **options)
            assert result.checkpoint_path is not None and expected.checkpoint_path is not None
            gap = same_checkpoint(Path(result.checkpoint_path), Path(expected.checkpoint_path))
            print(
                f"\nFSDP 2 nodes × 1 gloo process vs one process, step {result.step}: max |Δweight| = {gap:.3g}"
            )
            assert gap < TOLERANCE
            for key in ("loss/train", "loss/entropy", "loss/kl_policy_ref", "loss/grad_norm"):
                assert result.metrics[key] == pytest.approx(expected.metrics[key], rel=1e-4, abs=1e-7), key
        assert abs(result.metrics["loss/kl_policy_ref"]) > 1e-4  # the second step is away from the reference
        assert (model.output_dir() / "tensors" / "0001.png").stat().st_size > 0
        assert not (model.output_dir() / "tensors" / "0002.png").exists()

        workers = backend._slots["f"].workers  # reload step 1 into the shards and replay step 2 from it
        assert workers is not None
        checkpoints = model.output_dir() / "checkpoints"
        loaded = await asyncio.to_thread(workers.call, LoadRequest(str(checkpoints / "0001")), LoadReply)
        assert loaded.state.step == 1
        replay = TrainRequest(
            state=loaded.state,
            batch=one_row_batch,
            step=StepConfig(loss=LossConfig(kl_penalty_coef=0.5), precalculate_logprobs=True),
            learning_rate=1e-3,
            checkpoint_dir=str(tmp_path / "replay"),
        )
        replayed = await asyncio.to_thread(workers.call, replay, TrainReply)
        assert replayed.state.step == 2
        assert (
            same_checkpoint(tmp_path / "replay", checkpoints / "0002") < 1e-7
        )  # weights + optimizer restored
    finally:
        await backend.close()
        await reference.close()
        try:
            node_1.wait(timeout=60)
        finally:
            if node_1.poll() is None:
                node_1.kill()
    assert node_1.returncode == 0  # node 1 left cleanly when the backend closed

"""art_local.distributed without processes: row split, the reduction argument, the channel, config, failure text."""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from art_local.backend import LocalBackend
from art_local.distributed import DistributedConfig, resolve_train_devices
from art_local.distributed.channel import (
    HEADER,
    MAGIC,
    ChannelClosed,
    ProtocolError,
    recv_json,
    recv_message,
    send_json,
    send_message,
)
from art_local.distributed.group import _format_failure
from art_local.distributed.protocol import TrainReply
from art_local.training import (
    LossConfig,
    StepConfig,
    TrainBatch,
    TrainerConfig,
    TrainingState,
    build_components,
    forward_backward,
    policy_loss,
    prepare_batch,
)
from art_local.training.logprobs import logprobs_and_entropy
from art_local.training.step import micro_plan, select_rows, split_rows
from art_local.training.steps import micro_batch_loss

Groups = Callable[..., list[Any]]


@pytest.fixture(scope="module")
def rows_batch(tiny_tokenizer: Any, sort_groups: Groups) -> TrainBatch:
    """Four groups packed into rows of at most 40 tokens (several rows of different lengths)."""
    prepared = prepare_batch(sort_groups(4), tiny_tokenizer, max_sequence_length=40)
    assert prepared.batch is not None and prepared.batch.tokens_BT.shape[0] >= 3
    return prepared.batch


def test_split_rows_gives_every_row_to_exactly_one_rank_and_balances_tokens(rows_batch: TrainBatch) -> None:
    rows = rows_batch.tokens_BT.shape[0]
    for world_size in (1, 2, 3, rows + 2):
        shares = split_rows(rows_batch, world_size)
        assert len(shares) == world_size
        assert sorted(row for share in shares for row in share) == list(range(rows))
        assert split_rows(rows_batch, world_size) == shares  # every rank computes the same split
    lengths = (rows_batch.segment_ids_BT > 0).sum(dim=1).tolist()
    loads = [sum(lengths[r] for r in share) for share in split_rows(rows_batch, 2)]
    assert max(loads) - min(loads) <= max(lengths)  # greedy LPT: within one row of balanced
    assert split_rows(rows_batch, rows + 2)[-1] == []  # more ranks than rows: some ranks get none


def test_select_rows_keeps_the_rows_and_drops_only_trailing_padding(rows_batch: TrainBatch) -> None:
    rows = [rows_batch.tokens_BT.shape[0] - 1]  # the shortest row (packing puts the longest first)
    share = select_rows(rows_batch, rows)
    length = share.tokens_BT.shape[1]
    assert length < rows_batch.tokens_BT.shape[1]
    assert torch.equal(share.tokens_BT, rows_batch.tokens_BT[rows, :length])
    assert not (rows_batch.segment_ids_BT[rows, length:] > 0).any()
    assert share.num_trained_tokens == int(rows_batch.loss_mask_BT[rows].sum())
    assert micro_plan(rows_batch, 2, 1) == [[[r] for r in share] for share in split_rows(rows_batch, 2)]


def test_per_rank_losses_over_the_global_token_count_add_up_to_the_one_process_gradient(
    tiny_model_dir: Path, rows_batch: TrainBatch
) -> None:
    """The reduction argument of step.py without processes: Σ_ranks ∇(loss_r) = ∇(one-process loss)."""
    config = TrainerConfig(lora_rank=None)
    loss_config = LossConfig()
    whole = build_components(tiny_model_dir, config, device="cpu")
    forward_backward(whole, rows_batch)
    split = build_components(tiny_model_dir, config, device="cpu")
    total = rows_batch.num_trained_tokens
    shares = [select_rows(rows_batch, rows) for rows in split_rows(rows_batch, 2)]
    losses = [
        micro_batch_loss(split, share, loss_config, chunk_size=1024, total_tokens=total)[0]
        for share in shares
    ]
    for loss in losses:
        loss.backward()  # type: ignore[no-untyped-call]  # gradients add up, as DDP's average of N × loss does
    for (name, a), (_, b) in zip(whole.model.named_parameters(), split.model.named_parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        assert torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-4), name
    own_tokens = shares[0].num_trained_tokens
    own = micro_batch_loss(split, shares[0], loss_config, chunk_size=1024, total_tokens=own_tokens)[0]
    assert not torch.isclose(own, losses[0])  # the rank's own token count would be the wrong denominator


def test_micro_batch_loss_hooks_replace_the_forward_and_the_kl_mean(
    tiny_model_dir: Path, rows_batch: TrainBatch
) -> None:
    config = LossConfig(kl_penalty_coef=0.5)
    components = build_components(tiny_model_dir, TrainerConfig(lora_rank=None), device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():  # move away from the reference so the KL term is not zero
        for parameter in components.model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    total = rows_batch.num_trained_tokens
    calls: list[int] = []

    def forward(micro: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(micro.tokens_BT.shape[0])
        return logprobs_and_entropy(components.model, micro, chunk_size=1024)

    plain, plain_shares = micro_batch_loss(
        components, rows_batch, config, chunk_size=1024, total_tokens=total
    )
    hooked, hooked_shares = micro_batch_loss(
        components, rows_batch, config, chunk_size=1024, total_tokens=total, logprobs_fn=forward
    )
    assert calls == [rows_batch.tokens_BT.shape[0]] and torch.equal(plain, hooked)
    assert plain_shares == hooked_shares and plain_shares["loss/kl_policy_ref"] != 0
    own_mean = torch.tensor(plain_shares["loss/kl_policy_ref"])
    same, _ = micro_batch_loss(
        components, rows_batch, config, chunk_size=1024, total_tokens=total, kl_mean=own_mean
    )
    shifted, _ = micro_batch_loss(
        components, rows_batch, config, chunk_size=1024, total_tokens=total, kl_mean=own_mean + 1
    )
    assert torch.allclose(same, plain, rtol=1e-5) and not torch.allclose(shifted, plain, rtol=1e-3)


def test_policy_loss_kl_mean_overrides_only_the_mean() -> None:
    new_BT = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    kwargs: dict[str, Any] = {
        "old_logprobs_BT": torch.tensor([[-1.0, -2.0, -0.5]]),
        "advantages_BT": torch.tensor([[1.0, -1.0, 0.5]]),
        "weights_BT": torch.ones(1, 3),
        "loss_mask_BT": torch.tensor([[True, True, True]]),
        "sequence_index_BT": torch.zeros(1, 3, dtype=torch.long),
        "config": LossConfig(kl_penalty_coef=1.0),
        "ref_logprobs_BT": torch.tensor([[-1.5, -1.0, -0.5]]),
    }
    default = policy_loss(new_BT, **kwargs)
    own = policy_loss(new_BT, **kwargs, kl_mean=default.metrics["loss/kl_policy_ref"])
    other = policy_loss(new_BT, **kwargs, kl_mean=torch.tensor(3.0))
    assert torch.equal(default.loss, own.loss)
    assert float(other.metrics["loss/kl_policy_ref"]) == 3.0 and not torch.equal(other.loss, default.loss)


def test_channel_frames_round_trip_and_every_read_is_bounded() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        send_json(left, {"token": "t", "world_size": 2}, timeout_s=5)
        assert recv_json(right, timeout_s=5) == {"token": "t", "world_size": 2}
        reply = TrainReply(
            state=TrainingState(step=3), metrics={"loss/train": 0.5}, weights={"w": torch.ones(2)}
        )
        big = torch.arange(300_000, dtype=torch.float32)  # larger than a socket buffer: needs a reader
        reader = threading.Thread(target=lambda: received.append(recv_message(right, timeout_s=10)))
        received: list[Any] = []
        reader.start()
        send_message(left, (reply, big), timeout_s=10)
        reader.join(timeout=10)
        got_reply, got_big = received[0]
        assert got_reply.state == reply.state and torch.equal(got_reply.weights["w"], torch.ones(2))
        assert torch.equal(got_big, big)
        left.sendall(HEADER.pack(MAGIC, 2, 10) + b"abc")  # a frame that never completes
        with pytest.raises(TimeoutError, match="trainer channel"):
            recv_message(right, timeout_s=0.3)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.sendall(struct.pack("!4sBQ", b"HTTP", 2, 1))
        with pytest.raises(ProtocolError, match="bad frame header"):
            recv_message(b, timeout_s=1)
        a.sendall(HEADER.pack(MAGIC, 1, 1 << 20))
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            recv_json(b, timeout_s=1)  # an unauthenticated peer cannot make us buffer a large hello
        a.close()
        with pytest.raises(ChannelClosed):
            recv_message(b, timeout_s=1)


def test_config_errors_name_the_value_and_the_fix(tmp_path: Path) -> None:
    assert resolve_train_devices(3) == DistributedConfig(nproc_per_node=3)
    config = DistributedConfig(nproc_per_node=2, gpus=(1, 3), nnodes=2)
    assert config.world_size == 4 and config.worker_env()["CUDA_VISIBLE_DEVICES"] == "1,3"
    with pytest.raises(ValueError, match=r"gpus=\(1,\) must list nproc_per_node=2"):
        DistributedConfig(gpus=(1,))
    with pytest.raises(ValueError, match="strategy='zero3' is unknown; use 'ddp' or 'fsdp'"):
        DistributedConfig(strategy="zero3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="collective_timeout_s=60.0 must be below request_timeout_s=30.0"):
        DistributedConfig(collective_timeout_s=60.0, request_timeout_s=30.0)
    with pytest.raises(ValueError, match="nproc_per_node=0 must be a positive int"):
        LocalBackend(str(tmp_path / "art"), train_devices=0)
    with pytest.raises(TypeError, match="train_devices=True must be an int"):
        LocalBackend(str(tmp_path / "art"), train_devices=True)
    assert dataclasses.replace(config, strategy="fsdp").strategy == "fsdp"


def test_failure_text_names_the_rank_that_raised_not_the_ones_that_lost_their_peer() -> None:
    report = {
        "ranks": {
            "0": {
                "exitcode": 1,
                "signal": None,
                "message": "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1",
                "traceback": "Traceback (most recent call last):\n  gloo stuff\n",
                "timestamp": 100,
            },
            "1": {
                "exitcode": 1,
                "signal": None,
                "message": "IndexError: index out of range in self",
                "traceback": 'Traceback (most recent call last):\n  File "worker.py"\nIndexError: index out of range\n',
                "timestamp": 100,
            },
            "2": {"exitcode": -15, "signal": "SIGTERM", "message": None, "traceback": None, "timestamp": 99},
        }
    }
    text = _format_failure(report, Path("/tmp/log"))
    assert text.startswith(
        "trainer worker rank 1 failed (exit code 1): IndexError: index out of range in self"
    )
    assert 'File "worker.py"' in text and "rank 0 also stopped" in text and "rank 2 also stopped" in text
    launcher = _format_failure(
        {"launcher": {"message": "RendezvousTimeoutError: x", "traceback": "tb\n"}}, Path("l")
    )
    assert "the torchrun launcher failed: RendezvousTimeoutError: x" in launcher


def test_the_worker_loop_serves_the_protocol_in_a_world_of_one(
    tmp_path: Path, tiny_model_dir: Path, rows_batch: TrainBatch, claim_written_with: Callable[..., Path]
) -> None:
    """serve() in this process (gloo, world size 1): setup, train + checkpoint, clean load error, weights, ping."""
    import torch.distributed as dist

    from art_local.distributed.protocol import (
        ErrorReply,
        LoadReply,
        LoadRequest,
        Ping,
        SetupReply,
        SetupRequest,
        ShutdownReply,
        ShutdownRequest,
        TrainRequest,
        WeightsReply,
        WeightsRequest,
    )
    from art_local.distributed.worker import Rank, next_request, serve
    from art_local.training import CheckpointMismatchError, get_weights, load_checkpoint, optim_step

    config = TrainerConfig(lora_rank=4)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        me = Rank(0, 1, torch.device("cpu"), dist.new_group(backend="gloo"), child, 30.0, 0.05)
        assert isinstance(
            next_request(me), Ping
        )  # a quiet parent: rank 0 pings the others instead of waiting

        def ask(request: object) -> object:
            send_message(parent, request, timeout_s=10)
            return recv_message(parent, timeout_s=60)

        worker = threading.Thread(target=serve, args=(me,), daemon=True)
        worker.start()
        assert ask(SetupRequest(str(tiny_model_dir), config, "ddp")) == SetupReply(world_size=1, is_lora=True)
        directory = tmp_path / "checkpoints" / "0001"
        request = TrainRequest(TrainingState(), rows_batch, StepConfig(), 1e-2, checkpoint_dir=str(directory))
        reply = ask(request)
        assert isinstance(reply, TrainReply) and reply.state.step == 1
        reference = build_components(tiny_model_dir, config, device="cpu")
        metrics = forward_backward(reference, rows_batch)
        state = optim_step(
            reference, TrainingState(), learning_rate=1e-2, tokens=rows_batch.num_trained_tokens
        )
        assert reply.state.grad_norm == pytest.approx(state.grad_norm, rel=1e-6)
        assert reply.metrics["loss/train"] == pytest.approx(metrics["loss/train"], rel=1e-6, abs=1e-12)
        saved = build_components(tiny_model_dir, config, device="cpu")
        assert load_checkpoint(saved, directory).step == 1
        expected, got = get_weights(reference), get_weights(saved)
        assert all(torch.allclose(expected[k], got[k], atol=1e-7) for k in expected)

        wrong = claim_written_with(
            dataclasses.replace(config, weight_decay=0.1), directory, tmp_path / "0001"
        )
        refused = ask(LoadRequest(str(wrong)))
        assert isinstance(refused, ErrorReply) and isinstance(refused.error, CheckpointMismatchError)
        assert "allow_config_mismatch=True" in refused.summary and "Traceback" in refused.traceback
        assert isinstance(ask(LoadRequest(str(directory))), LoadReply)  # still serving after the refusal
        weights = ask(WeightsRequest())
        assert isinstance(weights, WeightsReply) and "model.embed_tokens.weight" in weights.weights
        assert isinstance(ask(ShutdownRequest()), ShutdownReply)
        worker.join(timeout=30)
        assert not worker.is_alive()
    finally:
        parent.close()
        child.close()
        dist.destroy_process_group()


def _fake_group(tmp_path: Path, peer: socket.socket, seconds: int = 60) -> Any:
    """A WorkerGroup over a socketpair whose "launcher" is a sleeping process (nothing answers)."""
    import subprocess
    import sys

    from art_local.distributed.group import WorkerGroup

    process = subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({seconds})"], start_new_session=True
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = DistributedConfig(request_timeout_s=0.5, collective_timeout_s=0.25, shutdown_timeout_s=1)
    hello = {"world_size": 2, "workers": []}
    return WorkerGroup(config, process, peer, run_dir, tmp_path / "workers.log", hello), process


def test_a_request_without_reply_times_out_and_stops_the_workers(tmp_path: Path) -> None:
    from art_local.distributed import DistributedWorkerError
    from art_local.distributed.protocol import WeightsReply, WeightsRequest

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    group, process = _fake_group(tmp_path, mine)
    with theirs:
        with pytest.raises(
            TimeoutError, match="WeightsRequest got no reply .* within 0.5 s; they were stopped"
        ):
            group.call(WeightsRequest(), WeightsReply)
        assert process.poll() is not None and group.failed  # the "launcher" was terminated, not left running
        with pytest.raises(DistributedWorkerError, match="failed earlier; close the backend"):
            group.call(WeightsRequest(), WeightsReply)
        group.close()
        group.close()  # idempotent
        assert not (tmp_path / "run").exists()


def test_rank_0_going_away_raises_the_torchrun_report_with_the_traceback(tmp_path: Path) -> None:
    import json

    from art_local.distributed import DistributedWorkerError
    from art_local.distributed.protocol import WeightsReply, WeightsRequest

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    group, process = _fake_group(tmp_path, mine, seconds=1)
    report = {
        "ranks": {
            "1": {
                "exitcode": 1,
                "message": "ValueError: boom",
                "traceback": "Traceback (most recent call last):\n  File 'x'\nValueError: boom\n",
                "timestamp": 5,
            }
        }
    }
    (tmp_path / "run" / "failure.json").write_text(json.dumps(report))
    theirs.close()  # rank 0 died: the channel reaches end of file
    with pytest.raises(DistributedWorkerError, match="rank 1 failed \\(exit code 1\\): ValueError: boom"):
        group.call(WeightsRequest(), WeightsReply)
    assert process.poll() is not None
    group.close()

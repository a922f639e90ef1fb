"""A trainer worker: one process per device, started by torchrun (``python -m art_local.distributed.worker``).

Global rank 0 connects to the parent's channel (``ART_DISTRIBUTED_CHANNEL``), reads each request and broadcasts it
to the other ranks over a gloo group; every rank handles it collectively and rank 0 sends the reply. Any
exception ends the process: torchrun's ``@record`` writes its traceback to the error file, the agent stops the
other ranks, and the parent raises ``DistributedWorkerError`` with that traceback. On another node, run this
module under plain torchrun (DISTRIBUTED.md).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from art_local.distributed.channel import ChannelClosed, recv_message, send_json, send_message, wait_readable
from art_local.distributed.config import (
    CHANNEL_ENV,
    COLLECTIVE_TIMEOUT_ENV,
    DEVICE_ENV,
    REQUEST_TIMEOUT_ENV,
    TOKEN_ENV,
    env_float,
)
from art_local.distributed.parallel import Parallel, host_components, pull_to_host, push_from_host, wrap
from art_local.distributed.protocol import (
    ErrorReply,
    LoadReply,
    LoadRequest,
    Ping,
    Reply,
    Request,
    SetupReply,
    SetupRequest,
    ShutdownReply,
    ShutdownRequest,
    TrainReply,
    TrainRequest,
    WeightsReply,
    WeightsRequest,
)

if TYPE_CHECKING:
    from art_local.training import TrainingState


@dataclass(frozen=True)
class Rank:
    """Who this process is and what it talks over."""

    rank: int
    world_size: int
    device: torch.device
    control: Any  # gloo group: requests and Python objects
    channel: socket.socket | None  # rank 0 only
    request_timeout_s: float
    heartbeat_s: float


def worker_device(local_rank: int) -> torch.device:
    """``cuda:{LOCAL_RANK}`` when ``ART_DISTRIBUTED_DEVICE`` is cuda (or auto with CUDA present), else CPU."""
    kind = os.environ.get(DEVICE_ENV, "auto")
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={kind!r} is unknown; use auto, cpu or cuda")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: {count} visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use at most {count} processes per node"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _connect(me: Rank, workers: list[Any]) -> socket.socket:
    path = os.environ.get(CHANNEL_ENV)
    if not path:
        raise RuntimeError(
            f"global rank 0 found no {CHANNEL_ENV}: it must run on the parent's machine as node rank 0 "
            "(LocalBackend launches it there; other nodes use --node-rank >= 1)"
        )
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.settimeout(me.request_timeout_s)
    channel.connect(path)
    hello = {"token": os.environ.get(TOKEN_ENV, ""), "world_size": me.world_size, "workers": workers}
    send_json(channel, hello, timeout_s=me.request_timeout_s)
    return channel


def next_request(me: Rank) -> Request:
    """Rank 0: the parent's next request (``Ping`` after a quiet heartbeat), broadcast to every rank."""
    holder: list[Any] = [None]
    if me.channel is not None:
        try:
            ready = wait_readable(me.channel, me.heartbeat_s)
            holder[0] = recv_message(me.channel, timeout_s=me.request_timeout_s) if ready else Ping()
        except ChannelClosed:
            holder[0] = None  # the parent is gone: everyone exits without a reply
    dist.broadcast_object_list(holder, src=0, group=me.control)
    return holder[0] if holder[0] is not None else ShutdownRequest()


def _setup(me: Rank, request: SetupRequest) -> tuple[Parallel, SetupReply]:
    from art_local.training import build_components

    components = build_components(request.base_model, request.config, device=me.device)
    parallel = wrap(
        components,
        strategy=request.strategy,
        rank=me.rank,
        world_size=me.world_size,
        control=me.control,
        base_model=request.base_model,
        config=request.config,
    )
    if request.strategy == "fsdp" and me.rank == 0:
        host_components(parallel)  # built now, so the first checkpoint does not wait for it
    return parallel, SetupReply(world_size=me.world_size, is_lora=components.is_lora)


def _load(me: Rank, parallel: Parallel, request: LoadRequest) -> Reply | None:
    """Rank 0 checks the checkpoint (a refusal is a clean reply), loads it into its host copy, every rank takes it.

    Only the check may fail cleanly: nothing has been modified then. Unreadable files after a passing check end
    the group like any other worker error.
    """
    from art_local.training.checkpoint import check_compatible, load_checkpoint, read_metadata

    allow = request.allow_config_mismatch

    directory = Path(request.directory)
    refusal: list[Any] = [None]
    if me.rank == 0:
        try:
            host = host_components(parallel)
            metadata = read_metadata(directory)
            check_compatible(metadata, host, directory, allow=allow)
        except Exception as error:
            refusal[0] = _error_reply(error)
    dist.broadcast_object_list(refusal, src=0, group=me.control)
    if isinstance(refusal[0], ErrorReply):
        return refusal[0]
    state = None
    if me.rank == 0:
        state = load_checkpoint(host_components(parallel), directory, allow_config_mismatch=allow)
    push_from_host(parallel)
    return None if state is None else LoadReply(state=state)  # only rank 0 replies


def _step(parallel: Parallel, request: TrainRequest) -> tuple[TrainingState, dict[str, float]]:
    """The same step function one process runs, on this rank."""
    from art_local.training.step import sft_step, train_step

    if not request.sft:
        plot_path = Path(request.plot_path) if request.plot_path else None
        return train_step(
            parallel,
            request.state,
            request.batch,
            request.step,
            learning_rate=request.learning_rate,
            plot_path=plot_path,
        )
    if request.batch is None:
        raise ValueError("an SFT step needs a batch")
    chunk = request.step.logprob_calculation_chunk_size
    state, loss = sft_step(
        parallel, request.state, request.batch, learning_rate=request.learning_rate, chunk_size=chunk
    )
    return state, {"loss/sft": loss}


def _train(me: Rank, parallel: Parallel, request: TrainRequest) -> TrainReply:
    from art_local.training import merged_state_dict, save_checkpoint

    state, metrics = _step(parallel, request)
    weights = None
    if request.checkpoint_dir is not None or request.return_weights:
        host = pull_to_host(parallel)  # collective under FSDP
        if host is not None and request.checkpoint_dir is not None:
            save_checkpoint(host, state, Path(request.checkpoint_dir))
        if host is not None and request.return_weights:
            weights = {key: value.cpu() for key, value in merged_state_dict(host).items()}
    return TrainReply(state=state, metrics=metrics, weights=weights)


def _weights(parallel: Parallel) -> WeightsReply:
    from art_local.training import merged_state_dict

    host = pull_to_host(parallel)
    weights = {} if host is None else {key: value.cpu() for key, value in merged_state_dict(host).items()}
    return WeightsReply(weights=weights)


def _error_reply(error: BaseException) -> ErrorReply:
    try:
        pickle.dumps(error)
        picklable: BaseException | None = error
    except Exception:
        picklable = None
    text = "".join(traceback.format_exception(error))
    return ErrorReply(error=picklable, summary=f"{type(error).__name__}: {error}", traceback=text)


def serve(me: Rank) -> None:
    """Handle requests until shutdown (or the parent's channel closes)."""
    parallel: Parallel | None = None
    while True:
        request = next_request(me)
        if isinstance(request, Ping):
            continue
        reply: Reply | None
        if isinstance(request, ShutdownRequest):
            reply = ShutdownReply()
        elif isinstance(request, SetupRequest):
            parallel, reply = _setup(me, request)
        elif parallel is None:
            raise RuntimeError(f"{type(request).__name__} before SetupRequest")
        elif isinstance(request, LoadRequest):
            reply = _load(me, parallel, request)
        elif isinstance(request, TrainRequest):
            reply = _train(me, parallel, request)
        elif isinstance(request, WeightsRequest):
            reply = _weights(parallel)
        else:
            raise TypeError(f"unknown request {request!r}")
        if me.channel is not None and reply is not None:
            try:
                send_message(me.channel, reply, timeout_s=me.request_timeout_s)
            except (ChannelClosed, BrokenPipeError):
                pass  # the parent left; the next request turns into a shutdown
        if isinstance(request, ShutdownRequest):
            return


@record
def main() -> None:
    """torchrun entry point: join the process group, serve the parent's requests, leave cleanly."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = worker_device(int(os.environ.get("LOCAL_RANK", "0")))
    collective_timeout = env_float(COLLECTIVE_TIMEOUT_ENV, 1800.0)
    timeout = timedelta(seconds=collective_timeout)
    if device.type == "cuda":
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    channel = None
    try:
        control = dist.new_group(backend="gloo", timeout=timeout)
        workers: list[Any] = [None] * world_size
        dist.all_gather_object(workers, [socket.gethostname(), os.getpid()], group=control)
        me = Rank(
            rank=rank,
            world_size=world_size,
            device=device,
            control=control,
            channel=None,
            request_timeout_s=env_float(REQUEST_TIMEOUT_ENV, 3600.0),
            heartbeat_s=min(60.0, collective_timeout / 4),
        )
        if rank == 0:
            channel = _connect(me, workers)
            me = dataclasses.replace(me, channel=channel)
        serve(me)
    finally:
        if channel is not None:
            channel.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

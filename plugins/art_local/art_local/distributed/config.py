"""Where and how ``LocalBackend`` trains in worker processes: ``DistributedConfig`` (frozen) and its env contract."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, TypeAlias

Strategy: TypeAlias = Literal["ddp", "fsdp"]
DeviceKind: TypeAlias = Literal["auto", "cpu", "cuda"]

# Environment of every worker (set by the launcher on node 0; export the same values on other nodes when not
# default). The channel variables are read by global rank 0 only.
CHANNEL_ENV = "ART_DISTRIBUTED_CHANNEL"  # the parent's Unix-domain socket path
TOKEN_ENV = "ART_DISTRIBUTED_TOKEN"  # the secret rank 0 proves itself with
DEVICE_ENV = "ART_DISTRIBUTED_DEVICE"  # auto | cpu | cuda
COLLECTIVE_TIMEOUT_ENV = "ART_DISTRIBUTED_COLLECTIVE_TIMEOUT_S"  # process-group timeout in seconds
REQUEST_TIMEOUT_ENV = "ART_DISTRIBUTED_REQUEST_TIMEOUT_S"  # how long rank 0 waits for the rest of a frame


@dataclass(frozen=True)
class DistributedConfig:
    """Run the trainer in ``nproc_per_node`` worker processes started by torchrun's elastic launcher.

    ``strategy``: "ddp" replicates the model on every rank (small models, LoRA); "fsdp" shards parameters,
    gradients and optimizer state (FSDP2 ``fully_shard``, one unit per decoder layer). ``device``: "auto" = one
    CUDA device per process with NCCL when CUDA is present, else CPU processes with gloo. ``gpus``: the CUDA
    indices of this machine the workers use (``CUDA_VISIBLE_DEVICES``), e.g. ``(1, 2, 3)`` to keep GPU 0 for
    inference; ``nproc_per_node`` must then equal ``len(gpus)``. Multi-node: ``nnodes > 1`` uses torchrun's static
    rendezvous at ``master_addr:master_port``; this machine is node 0 and hosts global rank 0 (DISTRIBUTED.md).
    Every wait is bounded: ``start_timeout_s`` (launch, rendezvous, model load), ``request_timeout_s`` (one
    train/save/weights request), ``collective_timeout_s`` (a stuck collective inside the workers),
    ``shutdown_timeout_s`` (a clean exit before the workers are killed).
    """

    nproc_per_node: int = 2
    strategy: Strategy = "ddp"
    device: DeviceKind = "auto"
    gpus: tuple[int, ...] | None = None
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    start_timeout_s: float = 600.0
    request_timeout_s: float = 3600.0
    collective_timeout_s: float = 1800.0
    shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.nproc_per_node, bool) or self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={self.nproc_per_node!r} must be a positive int")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy={self.strategy!r} is unknown; use 'ddp' or 'fsdp'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is unknown; use 'auto', 'cpu' or 'cuda'")
        if self.gpus is not None:
            if self.device == "cpu":
                raise ValueError(f"gpus={self.gpus} conflicts with device='cpu'; drop one of them")
            if len(self.gpus) != self.nproc_per_node or len(set(self.gpus)) != len(self.gpus):
                raise ValueError(
                    f"gpus={self.gpus} must list nproc_per_node={self.nproc_per_node} distinct CUDA indices "
                    "(one process per GPU)"
                )
        if self.nnodes < 1:
            raise ValueError(f"nnodes={self.nnodes} must be >= 1")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master_port={self.master_port} must be a TCP port (1..65535)")
        for name in ("start_timeout_s", "request_timeout_s", "collective_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value} must be a positive number of seconds")
        if self.collective_timeout_s >= self.request_timeout_s:
            raise ValueError(
                f"collective_timeout_s={self.collective_timeout_s} must be below request_timeout_s="
                f"{self.request_timeout_s}, so a stuck collective fails in the workers (with its traceback) "
                "before the parent gives up"
            )

    @property
    def world_size(self) -> int:
        """Processes over all nodes."""
        return self.nnodes * self.nproc_per_node

    def worker_env(self) -> dict[str, str]:
        """The ``ART_DISTRIBUTED_*`` variables every worker reads (see DISTRIBUTED.md for other nodes)."""
        env = {
            DEVICE_ENV: "cuda" if self.gpus is not None else self.device,
            COLLECTIVE_TIMEOUT_ENV: repr(self.collective_timeout_s),
            REQUEST_TIMEOUT_ENV: repr(self.request_timeout_s),
        }
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in self.gpus)
        return env


def resolve_train_devices(value: int | DistributedConfig) -> DistributedConfig:
    """``LocalBackend(train_devices=...)``: an int N means ``DistributedConfig(nproc_per_node=N)``."""
    if isinstance(value, DistributedConfig):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"train_devices={value!r} must be an int (processes on this machine) or a DistributedConfig"
        )
    return DistributedConfig(nproc_per_node=value)


def env_float(name: str, default: float) -> float:
    """A positive float from the environment (``default`` when unset)."""
    text = os.environ.get(name)
    if not text:
        return default
    value = float(text)
    if not value > 0:
        raise ValueError(f"{name}={text!r} must be a positive number of seconds")
    return value

"""The trainer's model under DDP or FSDP2, and full state moved between rank 0's plain copy and every rank.

``Parallel`` is this rank's ``art_local.training.world.Ranks``: every forward goes through one ``PolicyModule``
(so DDP's and FSDP's hooks run), and every rank calls it the same number of times in the same order. Rank 0 keeps a "host" copy with full, unsharded weights and a single-process
optimizer: under DDP it is the live model itself, under FSDP a CPU copy filled by gathering the shards. Saving,
loading and merged weights go through the host, so checkpoints keep the single-process layout exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from art_local.distributed.config import Strategy
from art_local.training.batch import TrainBatch
from art_local.training.logprobs import causal_lm
from art_local.training.state import TrainerConfig, TrainingComponents, build_components
from art_local.training.steps import trainable_parameters
from art_local.training.world import Mode, PolicyModule

_PREFIX = "model."  # PolicyModule holds the (peft) model as ``self.model``
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class Parallel:
    """One rank's mutable bundle: its components (sharded under FSDP), the wrapped module, rank 0's host copy."""

    components: TrainingComponents
    module: torch.nn.Module
    strategy: Strategy
    rank: int
    world_size: int
    control: Any  # the gloo process group for Python objects and metric sums
    base_model: str
    config: TrainerConfig
    host: TrainingComponents | None = None

    def forward(self, batch: TrainBatch, mode: Mode, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The wrapped policy's forward (DDP's and FSDP's hooks run)."""
        return self.module(batch, mode, chunk_size)  # type: ignore[no-any-return]

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Each value summed over every rank (float64, over the gloo group)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self.control)
        return [float(value) for value in tensor.tolist()]

    def gather_on_first(self, value: object) -> list[object] | None:
        """Every rank's ``value`` on rank 0 (None elsewhere)."""
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.control)
        return gathered if self.rank == 0 else None

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Reduce gradients over ranks in this backward only when ``enabled`` (the last micro-batch)."""
        if self.strategy == "ddp":
            with contextlib.nullcontext() if enabled else self.module.no_sync():  # type: ignore[operator]
                yield
            return
        self.module.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)  # type: ignore[operator]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP shards one by one (``model.get_decoder().layers``)."""
    decoder = causal_lm(model).get_decoder()  # type: ignore[operator]
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(decoder).__name__} has no `layers` ModuleList to shard; use DistributedConfig(strategy='ddp')"
        )
    return list(layers)


def _rebind_optimizer(components: TrainingComponents) -> None:
    """After ``fully_shard`` the parameters are new DTensors: point the (still empty) optimizer at them."""
    optimizer = components.optimizer
    new = trainable_parameters(components)
    groups = optimizer.param_groups
    if optimizer.state or len(groups) != 1 or len(groups[0]["params"]) != len(new):
        raise RuntimeError("the optimizer must be fresh, with one parameter group, before sharding")
    groups[0]["params"] = new


def wrap(
    components: TrainingComponents,
    *,
    strategy: Strategy,
    rank: int,
    world_size: int,
    control: Any,
    base_model: str,
    config: TrainerConfig,
) -> Parallel:
    """Wrap freshly built components in DDP or FSDP2 (decoder layers, then the whole policy)."""
    device = components.device
    policy = PolicyModule(components, touch_all_weights=strategy == "ddp")
    module: torch.nn.Module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
        module = DistributedDataParallel(policy, device_ids=device_ids, forward_sync_buffers=False)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        for parameter in trainable_parameters(components) if components.is_lora else []:
            dist.broadcast(parameter.data, src=0)  # every shard starts from rank 0's (seeded) adapter init
        mesh = init_device_mesh(device.type, (world_size,))
        for layer in decoder_layers(components.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)
        _rebind_optimizer(components)
        module = policy
    return Parallel(
        components=components,
        module=module,
        strategy=strategy,
        rank=rank,
        world_size=world_size,
        control=control,
        base_model=base_model,
        config=config,
        host=components if strategy == "ddp" and rank == 0 else None,
    )


def host_components(parallel: Parallel) -> TrainingComponents:
    """Rank 0's full copy (DDP: the live components; FSDP: a CPU copy in the same dtypes, built on first use)."""
    if parallel.rank != 0:
        raise RuntimeError("only rank 0 holds the host copy")
    if parallel.host is None:
        dtype = _DTYPE_NAMES[parallel.components.compute_dtype]
        config = dataclasses.replace(parallel.config, dtype=dtype)  # type: ignore[arg-type]
        host = build_components(parallel.base_model, config, device="cpu")
        host.config = parallel.config  # the dtype resolved, the same settings: checkpoints record these
        parallel.host = host
    return parallel.host


def trainable_names(components: TrainingComponents) -> list[str]:
    """Names of the trainable weights in optimizer order (``build_components`` makes AdamW over this order)."""
    return [name for name, parameter in components.model.named_parameters() if parameter.requires_grad]


def _indexed_optimizer_state(host: TrainingComponents, state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint) → the host optimizer's index-keyed one."""
    names = [_PREFIX + name for name in trainable_names(host)]
    index = {name: position for position, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]
        ],
    }


def _named_optimizer_state(host: TrainingComponents) -> dict[str, Any]:
    """The host optimizer's index-keyed state dict → keyed by the wrapped module's parameter names."""
    names = [_PREFIX + name for name in trainable_names(host)]
    state = host.optimizer.state_dict()
    return {
        "state": {names[position]: value for position, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[position] for position in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def _load_optimizer_state(optimizer: torch.optim.Optimizer, load: Callable[[], None]) -> None:
    """Run ``load``, then give hyper-parameters back the types they had (state dict round trips turn the
    ``betas`` tuple into a list, and checkpoints must stay identical to one process's)."""
    kinds = [
        {key: type(value) for key, value in group.items() if key != "params"}
        for group in optimizer.param_groups
    ]
    load()
    for group, types in zip(optimizer.param_groups, kinds, strict=True):
        for key, kind in types.items():
            if kind is tuple and isinstance(group.get(key), list):
                group[key] = tuple(group[key])


def pull_to_host(parallel: Parallel) -> TrainingComponents | None:
    """Collective: rank 0's host copy with the current full weights and optimizer state (None elsewhere)."""
    if parallel.strategy == "ddp":
        return parallel.host
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(parallel.module, options=options)
    optimizer_state = get_optimizer_state_dict(
        parallel.module, parallel.components.optimizer, options=options
    )
    if parallel.rank != 0:
        return None
    host = host_components(parallel)
    expected = set(trainable_names(host))
    loaded = {key.removeprefix(_PREFIX): value for key, value in weights.items()}
    if not expected <= set(loaded):
        raise RuntimeError(f"gathered weights lack {sorted(expected - set(loaded))[:3]}")
    result = host.model.load_state_dict(loaded, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"gathered weights hold unknown keys {sorted(result.unexpected_keys)[:3]}")
    indexed = _indexed_optimizer_state(host, cast(dict[str, Any], optimizer_state))
    _load_optimizer_state(host.optimizer, lambda: host.optimizer.load_state_dict(indexed))
    return host


def push_from_host(parallel: Parallel) -> None:
    """Collective: every rank's model and optimizer take rank 0's host weights and optimizer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    host = parallel.host if parallel.rank == 0 else None
    weights: dict[str, Any] = {}
    optimizer_state: dict[str, Any] = {}
    if host is not None:
        weights = {
            _PREFIX + name: parameter.detach().clone()
            for name, parameter in host.model.named_parameters()
            if parameter.requires_grad
        }
        optimizer_state = _named_optimizer_state(host)
    has_state = [bool(optimizer_state and optimizer_state["state"])]
    dist.broadcast_object_list(has_state, src=0, group=parallel.control)
    options = StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, ignore_frozen_params=True, strict=False
    )
    set_model_state_dict(parallel.module, weights, options=options)
    if has_state[0]:
        optimizer = parallel.components.optimizer
        _load_optimizer_state(
            optimizer,
            lambda: set_optimizer_state_dict(parallel.module, optimizer, optimizer_state, options=options),
        )

"""Know before you run out of memory: an estimate of one training step's peak, and a refusal when it cannot fit.

The estimate counts what a step holds at once: weights (fp32 master weights for a full fine-tune, the compute
dtype for a frozen LoRA base, or its NF4/int8 bytes with ``quantization`` plus one layer's dequantized
weight), gradients and AdamW's two moments for the trainable parameters, the frozen
reference model of a full fine-tune with a KL penalty, the decoder's saved activations (every layer's, or with
activation checkpointing only each layer's input plus one layer recomputed), the packed-row attention mask, and
one chunk of logits (never the whole sequence: see ``logprobs.py``). The activation coefficients were fitted
to ``bench/memory.py``'s CPU measurements (Llama-style layers, sdpa attention).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from art_local.training.state import (
    TrainerConfig,
    resolve_device,
    resolve_dtype,
    uses_activation_checkpointing,
)
from art_local.training.step_config import StepConfig

if TYPE_CHECKING:
    from art_local.distributed.config import DistributedConfig

GIB = 1024**3
# Bytes per token and layer of saved activations, in units of the compute dtype: SAVED_PER_HIDDEN × hidden +
# SAVED_PER_MLP × intermediate (norm inputs, q/k/v/o inputs and outputs, residuals; gate, up and their product).
SAVED_PER_HIDDEN = 10
SAVED_PER_MLP = 6
# fp32 copies of one logits chunk alive at the peak (logits, exp for logsumexp, softmax for the entropy, its
# product with the logits, their gradient in the recomputed backward).
LOGIT_COPIES = 5
WORKSPACE_BYTES = 256 * 1024**2  # allocator slack, autograd bookkeeping, BLAS and attention workspaces


class MemoryPlanError(RuntimeError):
    """The device cannot hold training as configured (the message has the numbers and what would fit)."""


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak bytes of one training step, by part."""

    device: str
    parameters: int
    trainable_parameters: int
    activation_checkpointing: bool
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    reference_bytes: int
    activations_bytes: int
    logits_bytes: int
    workspace_bytes: int

    @property
    def total_bytes(self) -> int:
        """The estimated peak."""
        return (
            self.weights_bytes
            + self.gradients_bytes
            + self.optimizer_bytes
            + self.reference_bytes
            + self.activations_bytes
            + self.logits_bytes
            + self.workspace_bytes
        )

    def describe(self) -> str:
        """``12.3 GiB (weights …, gradients …, …)``."""
        parts = ("weights", "gradients", "optimizer", "reference", "activations", "logits", "workspace")
        shown = [
            f"{name} {gib(getattr(self, f'{name}_bytes'))}"
            for name in parts
            if getattr(self, f"{name}_bytes")
        ]
        return f"{gib(self.total_bytes)} ({', '.join(shown)})"


def gib(size: int) -> str:
    """``size`` bytes as ``1.23 GiB``."""
    return f"{size / GIB:.2f} GiB"


def _model_config(model_config_or_path: Any) -> Any:
    if isinstance(model_config_or_path, (str, Path)):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model_config_or_path))
    return model_config_or_path


def count_parameters(
    model_config: Any, lora_rank: int | None, lora_targets: tuple[str, ...]
) -> tuple[int, int]:
    """(all parameters, trainable ones) of the model ``model_config`` describes, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total = sum(parameter.numel() for parameter in model.parameters())
    if lora_rank is None:
        return total, total
    targets = set(lora_targets)
    adapters = sum(
        lora_rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    return total, adapters


def plan_memory(
    model_config_or_path: Any,
    *,
    sequence_length: int,
    batch_rows: int,
    trainer_config: TrainerConfig,
    step: StepConfig | None = None,
    device: str | torch.device | None = None,
) -> MemoryPlan:
    """Estimate the peak memory of one training step of ``batch_rows`` rows × ``sequence_length`` tokens
    (``step``: the call's options, ``train()``'s defaults when None)."""
    step = StepConfig() if step is None else step
    if sequence_length < 1 or batch_rows < 1:
        raise ValueError(f"sequence_length={sequence_length} and batch_rows={batch_rows} must both be ≥ 1")
    model_config = _model_config(model_config_or_path)
    target = resolve_device(device)
    compute_bytes = resolve_dtype(trainer_config.dtype, target).itemsize
    total, trainable = count_parameters(model_config, trainer_config.lora_rank, trainer_config.lora_targets)
    checkpointing = uses_activation_checkpointing(trainer_config.activation_checkpointing, target, total)
    full = trainer_config.full_fine_tune
    weights = total * 4 if full else total * compute_bytes + trainable * 4
    if trainer_config.quantization != "none":
        weights -= quantization_savings(model_config, trainer_config.quantization, compute_bytes)
    if full and compute_bytes < 4:
        weights += total * compute_bytes  # autocast's low-precision copy of each weight
    reference = total * compute_bytes if full and step.loss.kl_penalty_coef > 0 else 0
    return MemoryPlan(
        device=str(target),
        parameters=total,
        trainable_parameters=trainable,
        activation_checkpointing=checkpointing,
        weights_bytes=weights,
        gradients_bytes=trainable * 4,
        optimizer_bytes=trainable * 8,
        reference_bytes=reference,
        activations_bytes=activation_bytes(
            model_config, sequence_length, batch_rows, compute_bytes, checkpointing
        ),
        logits_bytes=min(step.logprob_calculation_chunk_size, sequence_length * batch_rows)
        * int(model_config.vocab_size)
        * 4
        * LOGIT_COPIES,
        workspace_bytes=WORKSPACE_BYTES,
    )


def quantizable_linear_sizes(model_config: Any) -> list[int]:
    """Weights of each linear layer bitsandbytes quantizes: every ``nn.Linear`` but the output layer."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    output = model.get_output_embeddings()
    return [
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    ]


def quantization_savings(model_config: Any, quantization: str, compute_bytes: int) -> int:
    """Bytes a quantized base saves over the compute dtype, less the largest layer dequantized in the forward."""
    from art_local.training.quantize import bytes_per_weight

    sizes = quantizable_linear_sizes(model_config)
    if not sizes:
        return 0
    saved = sum(sizes) * (compute_bytes - bytes_per_weight(quantization))
    return int(saved) - 2 * max(sizes) * max(compute_bytes, 2)  # its dequantized weight and int8's fp16 input


def activation_bytes(
    model_config: Any, sequence_length: int, batch_rows: int, compute_bytes: int, checkpointing: bool
) -> int:
    """Saved decoder activations of one forward, plus the attention mask and the gathered hidden states."""
    hidden = int(model_config.hidden_size)
    mlp = int(getattr(model_config, "intermediate_size", None) or 4 * hidden)
    layers = int(model_config.num_hidden_layers)
    tokens = sequence_length * batch_rows
    one_layer = tokens * (SAVED_PER_HIDDEN * hidden + SAVED_PER_MLP * mlp) * compute_bytes
    saved = (layers * tokens * hidden * compute_bytes + one_layer) if checkpointing else layers * one_layer
    mask = batch_rows * sequence_length**2 * (1 + compute_bytes)  # bool mask and its additive float form
    return saved + mask + 3 * tokens * hidden * 4


def available_memory(device: str | torch.device | None = None) -> int:
    """Bytes free for training: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of /proc/meminfo on CPU."""
    target = resolve_device(device)
    if target.type == "cuda":
        free, _ = torch.cuda.mem_get_info(target)
        return int(free)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line; pass TrainerConfig(memory_check=False)")


Alternative = tuple[str, TrainerConfig, StepConfig, int]  # (label, configs, batch rows) of one way to fit


def _alternatives(config: TrainerConfig, step: StepConfig, batch_rows: int) -> list[Alternative]:
    """Single changes that lower memory, then all of them together (each label names where it is set)."""
    changes: list[tuple[str, dict[str, Any], dict[str, Any], int]] = []
    if config.activation_checkpointing is not True:
        changes.append(
            (
                "TrainerConfig(activation_checkpointing=True)",
                {"activation_checkpointing": True},
                {},
                batch_rows,
            )
        )
    if config.full_fine_tune:
        changes.append(("TrainerConfig(lora_rank=8)", {"lora_rank": 8}, {}, batch_rows))
    elif config.quantization != "nf4":
        changes.append(("TrainerConfig(quantization='nf4')", {"quantization": "nf4"}, {}, batch_rows))
    if config.dtype in ("auto", "float32"):
        changes.append(("TrainerConfig(dtype='bfloat16')", {"dtype": "bfloat16"}, {}, batch_rows))
    if step.logprob_calculation_chunk_size > 256:
        chunk = {"logprob_calculation_chunk_size": 256}
        changes.append(("train(logprob_calculation_chunk_size=256)", {}, chunk, batch_rows))
    if batch_rows > 1:
        changes.append(("TrainerConfig(micro_batch_rows=1)", {"micro_batch_rows": 1}, {}, 1))
    if len(changes) > 1:
        trainer_all: dict[str, Any] = {}
        step_all: dict[str, Any] = {}
        for _, trainer, per_call, _ in changes:
            trainer_all |= trainer
            step_all |= per_call
        changes.append((" + ".join(label for label, _, _, _ in changes), trainer_all, step_all, 1))
    return [
        (label, dataclasses.replace(config, **trainer), dataclasses.replace(step, **per_call), rows)
        for label, trainer, per_call, rows in changes
    ]


def check_memory_fits(
    model_config_or_path: Any,
    trainer_config: TrainerConfig,
    *,
    device: str | torch.device | None = None,
    sequence_length: int | None = None,
    batch_rows: int | None = None,
    available_bytes: int | None = None,
    step: StepConfig | None = None,
    distributed: DistributedConfig | None = None,
) -> MemoryPlan | None:
    """The plan for ``max_sequence_length`` × ``micro_batch_rows`` (1 when unset); refuses what cannot fit.

    With ``distributed`` (``LocalBackend(train_devices=...)``) the plan is one rank's (``rank_plan``) on the
    workers' device, against each GPU's free memory, or on CPU against this machine's share per local rank.
    None (with a warning) when the model cannot be planned, e.g. an architecture the meta device cannot build.
    """
    length = sequence_length or trainer_config.max_sequence_length
    rows = batch_rows or trainer_config.micro_batch_rows or 1
    step = StepConfig() if step is None else step
    if distributed is not None:
        device = workers_device(distributed)
    try:
        model_config = _model_config(model_config_or_path)
        single = plan_memory(
            model_config,
            sequence_length=length,
            batch_rows=rows,
            trainer_config=trainer_config,
            step=step,
            device=device,
        )
        plan = rank_plan(single, model_config, distributed)
    except Exception as error:  # an estimate that cannot be made must not block training
        warnings.warn(
            f"could not estimate the training memory of {model_config_or_path!r} "
            f"({type(error).__name__}: {str(error)[:200]}); training without the check",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    if distributed is not None:
        free, where = rank_budget(distributed, single, available_bytes)
    else:
        free, where = (available_memory(device) if available_bytes is None else available_bytes), ""
    if plan.total_bytes <= free:
        return plan
    fitting = []
    for label, config, other_step, alternative_rows in _alternatives(trainer_config, step, rows):
        other = plan_memory(
            model_config,
            sequence_length=length,
            batch_rows=alternative_rows,
            trainer_config=config,
            step=other_step,
            device=device,
        )
        other = rank_plan(other, model_config, distributed)
        if other.total_bytes <= free:
            fitting.append(f"{label} → {gib(other.total_bytes)}")
    advice = (
        "options that would fit: " + "; ".join(fitting)
        if fitting
        else "no TrainerConfig or train() option fits; use a smaller model, a shorter max_sequence_length or a larger device"
    )
    raise MemoryPlanError(
        f"training {plan.parameters / 1e9:.2f}B parameters ({plan.trainable_parameters / 1e6:.1f}M trainable) on "
        f"{plan.device} with sequence_length={length}, batch_rows={rows}, activation_checkpointing="
        f"{plan.activation_checkpointing}{where} needs about {plan.describe()}, but {gib(free)} is available; "
        f"{advice}. "
        "TrainerConfig(memory_check=False) skips this check"
    )


def workers_device(distributed: DistributedConfig) -> torch.device:
    """The device type the torchrun workers train on (``DistributedConfig.device``; "auto": CUDA when present)."""
    if distributed.gpus is not None or distributed.device == "cuda":
        return torch.device("cuda")
    if distributed.device == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def rank_plan(plan: MemoryPlan, model_config: Any, distributed: DistributedConfig | None) -> MemoryPlan:
    """One worker's share of ``plan``: DDP replicates everything and adds its gradient buckets (a second copy of
    the gradients); FSDP divides weights, gradients and AdamW states by the world size and gathers one decoder
    layer at a time (two with prefetching)."""
    if distributed is None:
        return plan
    if distributed.strategy == "ddp":
        return dataclasses.replace(plan, gradients_bytes=plan.gradients_bytes * 2)
    ranks = distributed.world_size
    layers = max(int(model_config.num_hidden_layers), 1)
    return dataclasses.replace(
        plan,
        weights_bytes=-(-plan.weights_bytes // ranks) + 2 * -(-plan.weights_bytes // layers),
        gradients_bytes=-(-plan.gradients_bytes // ranks),
        optimizer_bytes=-(-plan.optimizer_bytes // ranks),
    )


def rank_budget(
    distributed: DistributedConfig, single: MemoryPlan, available_bytes: int | None = None
) -> tuple[int, str]:
    """(bytes one rank may use, how the message says so). CUDA: the least free of this node's GPUs; CPU: the
    free memory (less FSDP rank 0's full host copy) split among the ``nproc_per_node`` local ranks."""
    ranks = distributed.nproc_per_node
    if workers_device(distributed).type == "cuda":
        indices = distributed.gpus if distributed.gpus is not None else tuple(range(ranks))
        if available_bytes is not None:
            return available_bytes, f" per rank on GPUs {list(indices)}"
        free = min(int(torch.cuda.mem_get_info(index)[0]) for index in indices)
        return free, f" per rank on GPUs {list(indices)} (the least free)"
    total = available_memory("cpu") if available_bytes is None else available_bytes
    host = single.weights_bytes + single.optimizer_bytes if distributed.strategy == "fsdp" else 0
    note = f", less rank 0's {gib(host)} host copy" if host else ""
    return max(
        total - host, 0
    ) // ranks, f" per rank ({ranks} {distributed.strategy} ranks share {gib(total)}{note})"

"""Trainer configuration, the explicit training state, and the one mutable bundle (model + optimizer)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch

from art_core.plugin_api import ADAMW
from art_local.cpu_features import auto_dtype
from art_local.training.quantize import Quantization, check_quantization

DTypeName: TypeAlias = Literal["auto", "float32", "bfloat16", "float16"]
Checkpointing: TypeAlias = bool | Literal["auto"]

# ``activation_checkpointing="auto"`` turns it on for models at least this large on CUDA (see the README).
AUTO_CHECKPOINTING_MIN_PARAMETERS = 1_000_000_000

# Device types whose fused AdamW kernel ships with every torch this package supports.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The fields checkpoints written before the static/per-call split hashed (their metadata has no
# "fingerprint_version"): such a checkpoint resumes exactly when it did under the code that wrote it.
LEGACY_FINGERPRINT_FIELDS = (
    "betas",
    "eps",
    "weight_decay",
    "max_grad_norm",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
)
FINGERPRINT_VERSION = 2

# Field metadata of the settings that say how this machine runs the steps (dtype, micro-batching, activation
# checkpointing, ...): equal gradients either way (tested to 1e-5, or to bf16's rounding), so a checkpoint
# written with one value resumes with another. Every other field is what the adapter and the optimizer state
# mean (their shapes, the AdamW hyper-parameters, the base they were fitted to), and the fingerprint hashes it.
RUN_ONLY = {"run_only": True}


@dataclass(frozen=True)
class TrainerConfig:
    """The static trainer settings: fixed for a model's whole run, and what its checkpoints were written with.

    ``lora_rank=None`` means full fine-tuning. ``activation_checkpointing`` recomputes each decoder layer in the
    backward pass instead of keeping its activations (``"auto"``: on for CUDA and models of 1B parameters or
    more); ``memory_check=False`` skips ``LocalBackend.register``'s refusal when ``plan_memory`` says the device
    cannot hold training.

    What changes from call to call (learning rate, loss options, chunking, ...) is a ``StepConfig``, never here.
    ``fingerprint()`` hashes every field that gives a checkpoint its meaning; a resume with another value of one
    is refused unless allowed. The ``RUN_ONLY`` fields (how this machine computes the steps) may differ.
    """

    betas: tuple[float, float] = ADAMW.betas
    eps: float = ADAMW.eps
    weight_decay: float = ADAMW.weight_decay
    max_grad_norm: float | None = ADAMW.max_grad_norm
    lora_rank: int | None = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # How this machine computes the steps, not what a checkpoint holds: a resume may change them freely (the
    # memory plan's advice is to change them), so the fingerprint leaves them out (see RUN_ONLY).
    dtype: DTypeName = field(default="auto", metadata=RUN_ONLY)
    max_sequence_length: int = field(default=2048, metadata=RUN_ONLY)
    micro_batch_rows: int | None = field(default=None, metadata=RUN_ONLY)
    seed: int = field(default=0, metadata=RUN_ONLY)  # the new adapter's initialisation; a resume loads it
    activation_checkpointing: Checkpointing = field(default="auto", metadata=RUN_ONLY)
    memory_check: bool = field(default=True, metadata=RUN_ONLY)
    quantization: Quantization = "none"  # frozen LoRA base in NF4 or int8 (training/quantize.py)

    def __post_init__(self) -> None:
        if self.lora_rank is not None and self.lora_rank <= 0:
            raise ValueError(
                f"lora_rank={self.lora_rank} must be a positive int, or None for full fine-tuning"
            )
        if self.max_sequence_length < 2:
            raise ValueError(f"max_sequence_length={self.max_sequence_length} must be at least 2")
        if self.micro_batch_rows is not None and self.micro_batch_rows <= 0:
            raise ValueError(
                f"micro_batch_rows={self.micro_batch_rows} must be positive or None (all rows at once)"
            )
        if self.activation_checkpointing not in (True, False, "auto"):
            raise ValueError(
                f"activation_checkpointing={self.activation_checkpointing!r} must be True, False or 'auto'"
            )
        check_quantization(self.quantization, self.lora_rank)

    @property
    def full_fine_tune(self) -> bool:
        """True when every weight is trained (no LoRA adapter)."""
        return self.lora_rank is None

    def fingerprint_fields(self) -> dict[str, Any]:
        """Every field but the ``RUN_ONLY`` ones, canonical: LoRA targets as a set (sorted), no LoRA shape for a
        full fine-tune, and no ``quantization`` when it is ``"none"`` (so such a config hashes as it did before
        quantization existed)."""
        run_only = {f.name for f in dataclasses.fields(self) if f.metadata.get("run_only")}
        values = {name: value for name, value in self.to_json().items() if name not in run_only}
        if values.get("quantization") == "none":
            del values["quantization"]
        values["lora_targets"] = sorted(self.lora_targets)
        if self.lora_rank is None:
            values.update(lora_alpha=None, lora_targets=None)
        return values

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of ``fingerprint_fields()`` (stable across processes)."""
        return _digest(self.fingerprint_fields())

    def legacy_fingerprint(self) -> str:
        """The fingerprint checkpoints written before ``FINGERPRINT_VERSION`` 2 hold (``LEGACY_FINGERPRINT_FIELDS``)."""
        values = self.fingerprint_fields()
        return _digest({name: values[name] for name in LEGACY_FINGERPRINT_FIELDS})

    def to_json(self) -> dict[str, Any]:
        """Every field as JSON-ready values (stored in checkpoint metadata)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[no-any-return]


def _digest(values: dict[str, Any]) -> str:
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainingState:
    """Where training stands: returned by every step function, never mutated.

    ``grad_norm`` is the global gradient norm (before clipping) of the last optimizer step.
    """

    step: int = 0
    weight_version: int = 0
    tokens_seen: int = 0
    grad_norm: float = 0.0


@dataclass
class TrainingComponents:
    """The only mutable bundle: model (peft-wrapped for LoRA), optimizer, what they live on and were built with."""

    config: TrainerConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    checkpoint_dir: Path | None
    base_model: str
    compute_dtype: torch.dtype
    is_lora: bool
    reference_model: torch.nn.Module | None = None  # frozen base copy for KL in full fine-tuning (lazy)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: DTypeName, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32 (art_local.cpu_features)."""
    if name == "auto":
        return auto_dtype(device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def uses_activation_checkpointing(setting: Checkpointing, device: torch.device, num_parameters: int) -> bool:
    """What ``activation_checkpointing`` means for a model of ``num_parameters`` on ``device``."""
    if setting == "auto":
        return device.type == "cuda" and num_parameters >= AUTO_CHECKPOINTING_MIN_PARAMETERS
    return bool(setting)


def check_base_model(base_model: str | Path) -> str:
    """Fail early and clearly when ``base_model`` is neither a model directory nor a reachable hub id."""
    text = str(base_model)
    path = Path(text).expanduser()
    looks_like_path = (
        path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or path.exists()
    )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"base_model directory {text!r} has no config.json; point it at a saved HF model"
            )
        return str(path.resolve())
    if looks_like_path:
        raise FileNotFoundError(
            f"base_model {text!r} is not an existing directory; build one with art_local.tiny.build_tiny_model() "
            "or pass a Hugging Face hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'"
        )
    try:
        from huggingface_hub import hf_hub_download

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hf_hub_download(text, "config.json", local_files_only=offline, etag_timeout=10)
    except Exception as error:
        raise ValueError(
            f"base_model {text!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {str(error)[:200]}); check the id, HF_TOKEN, or the network"
        ) from error
    return text


def attention_implementation(base_model: str | Path) -> str:
    """``sdpa`` where the architecture supports it (packed rows need a custom 4D mask), else ``eager``.

    Gemma 2, for one, has no sdpa path in transformers: forcing it fails at load, eager serves it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_model))
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return "sdpa" if model_class is None or getattr(model_class, "_supports_sdpa", False) else "eager"


def build_components(
    base_model: str | Path,
    config: TrainerConfig,
    *,
    device: str | torch.device | None = None,
    lora_targets: Sequence[str] | None = None,
) -> TrainingComponents:
    """Load the base model on ``device``, wrap it in LoRA unless full fine-tuning, and make its AdamW."""
    from transformers import AutoModelForCausalLM

    name = check_base_model(base_model)
    target_device = resolve_device(device)
    compute_dtype = resolve_dtype(config.dtype, target_device)
    # Trainable weights stay fp32 (master weights); lower precision only through autocast in the forward.
    load_dtype = compute_dtype if config.lora_rank is not None else torch.float32
    attention = attention_implementation(name)
    if config.quantization != "none":
        from art_local.training.quantize import load_quantized

        model: Any = load_quantized(name, config.quantization, target_device, compute_dtype, attention)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=load_dtype, attn_implementation=attention)
        model.to(target_device)
    model.config.use_cache = False
    if uses_activation_checkpointing(config.activation_checkpointing, target_device, model.num_parameters()):
        # non-reentrant: LoRA's frozen inputs need no requires_grad hook, and DDP/FSDP accept it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)
    if config.lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        targets = list(lora_targets if lora_targets is not None else config.lora_targets)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    model.train()  # activation checkpointing runs only in training mode
    without_dropout(model)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return TrainingComponents(
        config=config,
        model=model,
        optimizer=make_optimizer(trainable, config, target_device),
        device=target_device,
        checkpoint_dir=None,
        base_model=name,
        compute_dtype=compute_dtype,
        is_lora=config.lora_rank is not None,
    )


def without_dropout(model: torch.nn.Module) -> None:
    """Turn every dropout of ``model`` off, in place, while it stays in training mode.

    A policy-gradient step divides the trainer's probability of each sampled token by the sampler's; dropout in
    the trainer's forward (GPT-2's configs default to 0.1) makes that ratio noise: measured on a random GPT-2,
    trainer and sampler disagreed by 0.23 nats at the same weights, 5e-7 without dropout. The sampler runs in
    eval mode, so the trainer must compute the same function. Covers ``nn.Dropout`` modules and the float
    ``attention_dropout`` / ``dropout`` rates attention layers read in training mode (Llama, Qwen, Gemma).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def make_optimizer(
    parameters: Sequence[torch.nn.Parameter], config: TrainerConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over ``parameters``, with torch's fused kernel where the device has one.

    Its ``lr`` is 0 until a step: no static learning rate exists, ``optim_step`` sets each step's own.
    Fused is one kernel over every tensor instead of a Python loop of per-tensor ops: measured on 18M fp32
    parameters on 2 CPU cores, 0.02 s per step instead of 0.07 s (numerically the same update up to rounding).
    """
    fused = device.type in FUSED_ADAMW_DEVICES and all(p.dtype.is_floating_point for p in parameters)
    return torch.optim.AdamW(
        parameters,
        lr=0.0,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
    )

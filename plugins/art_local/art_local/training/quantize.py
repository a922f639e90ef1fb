"""Quantized frozen base weights for LoRA (``TrainerConfig(quantization="nf4" | "int8")``) through bitsandbytes.

The base model's linear layers (all but the output layer, which bitsandbytes leaves in the compute dtype) are
stored as 4-bit NF4 (about 0.56 bytes a weight with its block scales) or 8-bit int8 with one scale per row
(LLM.int8(), about 1 byte), and dequantized layer by layer in the forward. Only the LoRA adapter trains, in
fp32 as without quantization, so a checkpoint is the same plain peft adapter; it loads on the unquantized base
too (its logprobs there differ by the quantization error, which ``tests/test_quantize.py`` measures).

What is served is what was trained: the transformers engine gets the *dequantized* base with the adapter
merged (``plain_state_dict``), so its logprobs are the trainer's up to float rounding. bitsandbytes is the
optional extra ``art-local[quantization]``; it runs on CUDA and, from 0.50 on, on CPU (the only devices it is
used on here). Nothing here imports it until a quantized model is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch

Quantization: TypeAlias = Literal["none", "nf4", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")
MIN_BITSANDBYTES = "0.50"  # the first release tested here (CPU kernels for NF4 and int8)
INSTALL_HINT = "pip install 'art-local[quantization]'"
SUPPORTED_DEVICES = ("cpu", "cuda")
NF4_BLOCK = 64  # weights per fp32 absmax scale (bitsandbytes' default blocksize, no nested quantization)


class QuantizationUnavailableError(RuntimeError):
    """bitsandbytes is missing, too old, or has no kernels for the training device."""


def check_quantization(quantization: str, lora_rank: int | None) -> None:
    """``TrainerConfig`` validation: a known kind, and only with LoRA (a quantized weight cannot be trained)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is unknown; use one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none" and lora_rank is None:
        raise ValueError(
            f"quantization={quantization!r} needs LoRA: quantized base weights are frozen, and lora_rank=None "
            "(a full fine-tune) trains every weight; set lora_rank (e.g. 8) or quantization='none'"
        )


def bytes_per_weight(quantization: str) -> float:
    """Bytes one quantized linear weight takes, scales included."""
    if quantization == "nf4":
        return 0.5 + 4 / NF4_BLOCK
    if quantization == "int8":
        return 1.0
    raise ValueError(f"quantization={quantization!r} stores no quantized weights")


@functools.cache
def _probe(device_type: str) -> str | None:
    """Why NF4 and int8 do not work on ``device_type`` with the installed bitsandbytes, or None when they do."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional
    except ImportError as error:
        return f"bitsandbytes is not installed ({error}); {INSTALL_HINT}"
    try:
        sample = torch.randn(NF4_BLOCK, NF4_BLOCK, device=device_type)
        packed, state = bnb_functional.quantize_4bit(sample, quant_type="nf4")
        restored = bnb_functional.dequantize_4bit(packed, state)
        int8, scales, _ = bnb_functional.int8_vectorwise_quant(sample.half())
        bnb_functional.int8_vectorwise_dequant(int8, scales)
        if not torch.isfinite(restored).all():
            return "its NF4 round trip returned non-finite values"
    except Exception as error:
        return (
            f"bitsandbytes {bitsandbytes.__version__} has no working {device_type} kernels "
            f"({type(error).__name__}: {str(error)[:160]}); bitsandbytes >= {MIN_BITSANDBYTES} runs on CPU and "
            f"CUDA: {INSTALL_HINT} --upgrade"
        )
    return None


def require_bitsandbytes(quantization: str, device: torch.device) -> None:
    """Raise ``QuantizationUnavailableError`` naming the option and the fix unless ``quantization`` runs on ``device``."""
    if device.type not in SUPPORTED_DEVICES:
        raise QuantizationUnavailableError(
            f"TrainerConfig(quantization={quantization!r}) runs on {' or '.join(SUPPORTED_DEVICES)} only, not "
            f"{device.type}; train on one of those or set quantization='none'"
        )
    problem = _probe(device.type)
    if problem is not None:
        raise QuantizationUnavailableError(
            f"TrainerConfig(quantization={quantization!r}) cannot run on {device.type}: {problem}; "
            "or set quantization='none'"
        )


def quantization_available(device: str | torch.device = "cpu") -> bool:
    """True when NF4 and int8 run on ``device`` (bitsandbytes installed, with kernels for it)."""
    target = torch.device(device)
    return target.type in SUPPORTED_DEVICES and _probe(target.type) is None


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """The transformers ``BitsAndBytesConfig`` of ``quantization``."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization={quantization!r} is not a quantized kind")


def load_quantized(
    base_model: str | Path,
    quantization: str,
    device: torch.device,
    compute_dtype: torch.dtype,
    attention: str,
) -> Any:
    """The base model with its linear layers quantized, on ``device`` (checked first: a clear error, not a crash)."""
    import warnings

    from transformers import AutoModelForCausalLM

    require_bitsandbytes(quantization, device)
    place = f"{device.type}:{device.index}" if device.index is not None else device.type
    with warnings.catch_warnings():  # int8 on CPU says, per layer, that fp32 inputs become fp16
        warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
        model = AutoModelForCausalLM.from_pretrained(
            str(base_model),
            dtype=compute_dtype,
            attn_implementation=attention,
            quantization_config=bitsandbytes_config(quantization, compute_dtype),
            device_map={"": place},
        )
    if device.type == "cpu":
        release_file_mapping(model)
    return model


def release_file_mapping(model: torch.nn.Module) -> None:
    """Copy the unquantized tensors (embeddings, norms, output layer) out of the safetensors file they are
    mapped from. Quantizing read every page of that file; while any tensor views it, those pages stay resident
    (measured: 688 MiB of a 0.94 GiB fp32 file kept beside a 345 MiB NF4 model; 544 MiB resident in all after)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype.is_floating_point:
                tensor.data = tensor.data.clone()


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` or ``Linear8bitLt`` (without importing bitsandbytes for plain models)."""
    return (
        type(module).__name__ in ("Linear4bit", "Linear8bitLt") and "bitsandbytes" in type(module).__module__
    )


def is_quantized(model: torch.nn.Module) -> bool:
    """True when any layer of ``model`` holds bitsandbytes-quantized weights."""
    return any(is_quantized_linear(module) for module in model.modules())


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 weight a quantized linear layer computes with."""
    import bitsandbytes.functional as bnb_functional

    weight: Any = module.weight
    restored: torch.Tensor
    if type(module).__name__ == "Linear4bit":
        restored = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    else:  # int8: one fp32 scale per output row, on the weight (or, in older releases, the layer's state)
        scales = getattr(weight, "SCB", None)
        if scales is None:
            layer_state: Any = getattr(module, "state", None)
            scales = layer_state.SCB
        restored = bnb_functional.int8_vectorwise_dequant(weight.data, scales)
    return restored.float()


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as the unquantized model's: each quantized weight dequantized (fp32), its
    quantization state (absmax, quant map, SCB, format) dropped. Other entries are the live tensors."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if not is_quantized_linear(module):
            continue
        prefix = f"{name}."
        for key in [key for key in state if key.startswith(prefix) and key != f"{prefix}bias"]:
            del state[key]
        state[f"{prefix}weight"] = dequantized_weight(module)
    return state


def dequantized_base_weights(base_model: str | Path, quantization: str) -> dict[str, torch.Tensor]:
    """fp32 CPU weights of ``base_model`` as the trainer sees them: quantized, then dequantized."""
    model = load_quantized(base_model, quantization, torch.device("cpu"), torch.float32, "eager")
    return {key: value.detach().float().clone() for key, value in plain_state_dict(model).items()}


def quantization_of(metadata: Mapping[str, Any]) -> str:
    """The ``quantization`` a checkpoint's metadata records ("none" for checkpoints that predate it)."""
    return str(metadata.get("config", {}).get("quantization", "none"))

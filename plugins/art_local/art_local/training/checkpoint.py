"""Atomic checkpoints (weights + optimizer + metadata), resume with a config fingerprint check, merged weights.

A checkpoint directory holds ``adapter_model.safetensors`` + ``adapter_config.json`` (peft format, LoRA) or
``model.safetensors`` (full fine-tune), ``optimizer.pt`` and, written last, ``metadata.json``. It is written into
a temporary sibling, fsynced and renamed, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from art_core.plugin_api import atomic_replace_dir
from art_core.plugin_api import remove_stale_temporaries as durable_remove_stale_temporaries
from art_local.training.logprobs import causal_lm
from art_local.training.state import FINGERPRINT_VERSION, TrainerConfig, TrainingComponents, TrainingState

CHECKPOINT_FORMAT = 1
ADAPTER_FILE, ADAPTER_CONFIG_FILE, FULL_FILE = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "model.safetensors",
)
OPTIMIZER_FILE, METADATA_FILE = "optimizer.pt", "metadata.json"
# Test hook: when set to a file path, the writer records the temp dir there and waits (to be SIGKILLed).
CRASH_TEST_PAUSE_ENV = "ART_LOCAL_CRASH_TEST_PAUSE_FILE"
_STEP_DIR = re.compile(r"^\d{4,}$")


class CheckpointMismatchError(ValueError):
    """A checkpoint was written with another trainer configuration."""


def get_weights(components: TrainingComponents) -> dict[str, torch.Tensor]:
    """Copies of the trainable weights (peft adapter keys for LoRA, the model's state dict for full)."""
    if components.is_lora:
        from peft import get_peft_model_state_dict

        weights = get_peft_model_state_dict(components.model)
    else:
        weights = components.model.state_dict()
    return {key: value.detach().clone() for key, value in weights.items()}


def load_weights(components: TrainingComponents, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` (as from ``get_weights``) into the model in place (the optimizer keeps its parameters)."""
    expected = set(get_weights(components))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise ValueError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        if components.is_lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(components.model, dict(weights))
        else:
            components.model.load_state_dict(dict(weights), strict=True)


@dataclass(frozen=True)
class LowRankMerge:
    """One LoRA layer's merged weight, ``base + scaling · (B @ A)``, not yet computed.

    ``copy_to`` writes it straight into a destination of the same shape (a served module's weight), with no
    full-size delta or sum allocated on the way: publishing a LoRA step of the 18M model spent 18 ms building
    those temporaries. ``materialize`` is the tensor ``merged_state_dict`` returns.
    """

    base: torch.Tensor
    lora_a: torch.Tensor  # [rank, in]
    lora_b: torch.Tensor  # [out, rank]
    scaling: float

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    def materialize(self, dtype: torch.dtype) -> torch.Tensor:
        """The merged weight in ``dtype``, merged in fp32 (as peft's ``get_delta_weight`` on CPU), with one
        full-size temporary."""
        merged = self.base.to(torch.float32, copy=True)
        merged.addmm_(self.lora_b.float(), self.lora_a.float(), alpha=self.scaling)
        return merged.to(dtype)

    def copy_to(self, destination: torch.Tensor) -> None:
        """``destination[...] = merged weight``, in place; in fp32 without temporaries, else merged in fp32 once."""
        if destination.dtype != torch.float32:
            destination.copy_(self.materialize(torch.float32))
            return
        destination.copy_(self.base)
        destination.addmm_(self.lora_b.float(), self.lora_a.float(), alpha=self.scaling)


def merged_weights(components: TrainingComponents) -> dict[str, torch.Tensor | LowRankMerge]:
    """Full weights keyed as the base HF model's ``state_dict()``: the live tensors (no copy), and each plain
    LoRA ``Linear`` as a ``LowRankMerge``; read them before the next optimizer step changes them.

    Other adapted layers (fan-in-fan-out, DoRA) and a quantized base come merged, as tensors.
    """
    dtype = components.compute_dtype
    model = causal_lm(components.model)
    with torch.no_grad():
        if not components.is_lora:
            return {key: value.detach() for key, value in model.state_dict().items()}
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        from art_local.training.quantize import is_quantized, plain_state_dict

        quantized = is_quantized(model)  # served as trained: the dequantized base, adapter merged
        state = plain_state_dict(model) if quantized else model.state_dict()
        merged: dict[str, torch.Tensor | LowRankMerge] = {
            key.replace(".base_layer.", "."): value.detach()
            for key, value in state.items()
            if ".lora_" not in key
        }
        for name, module in model.named_modules():
            if not (isinstance(module, LoraLayer) and "default" in module.lora_A):
                continue
            adapted = cast(Any, module)
            plain = (
                type(module) is LoraLinear
                and not quantized
                and not adapted.fan_in_fan_out
                and not adapted.use_dora.get("default", False)
                and type(adapted.get_base_layer()) is torch.nn.Linear
            )
            if plain:
                merged[f"{name}.weight"] = LowRankMerge(
                    adapted.get_base_layer().weight.detach(),
                    adapted.lora_A["default"].weight.detach(),
                    adapted.lora_B["default"].weight.detach(),
                    float(adapted.scaling["default"]),
                )
                continue
            base = state[f"{name}.base_layer.weight"] if quantized else adapted.get_base_layer().weight
            delta = adapted.get_delta_weight("default")
            merged[f"{name}.weight"] = (base.float() + delta.float()).to(dtype)
        return merged


def merged_state_dict(components: TrainingComponents, *, copy: bool = True) -> dict[str, torch.Tensor]:
    """Full weights with any LoRA merged, keyed as the base HF model's ``state_dict()``, in compute dtype.

    ``copy=False`` returns the live weights themselves wherever no conversion is needed (no copy of a full
    fine-tune at all): read them before the next optimizer step changes them.
    """
    dtype = components.compute_dtype
    return {
        key: value.materialize(dtype) if isinstance(value, LowRankMerge) else value.to(dtype, copy=copy)
        for key, value in merged_weights(components).items()
    }


def merged_state_dict_from_checkpoint(
    base_model: str | Path, checkpoint_dir: Path
) -> dict[str, torch.Tensor]:
    """Full fp32 CPU weights of a saved step (base model + its adapter, or its full weights)."""
    from safetensors.torch import load_file, load_model
    from transformers import AutoModelForCausalLM

    directory = Path(checkpoint_dir)
    if not (directory / FULL_FILE).is_file() and not (directory / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds neither {ADAPTER_FILE} nor {FULL_FILE}")
    from art_local.training.quantize import dequantized_base_weights, quantization_of

    quantization = (
        quantization_of(read_metadata(directory)) if (directory / METADATA_FILE).is_file() else "none"
    )
    if quantization != "none":  # the base the adapter was trained on: quantized, then dequantized
        merged = dequantized_base_weights(base_model, quantization)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
        if (directory / FULL_FILE).is_file():
            load_model(model, str(directory / FULL_FILE), strict=True)
        merged = {key: value.detach().clone() for key, value in model.state_dict().items()}
    if (directory / FULL_FILE).is_file():
        return merged
    adapter = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    rank = adapter["r"]
    scale = adapter["lora_alpha"] / (rank**0.5 if adapter.get("use_rslora") else rank)
    weights = load_file(str(directory / ADAPTER_FILE))
    for key, lora_a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        lora_b = weights[key.replace(".lora_A.", ".lora_B.")]
        merged[f"{module}.weight"] += (lora_b.float() @ lora_a.float()) * scale
    return merged


def _pause_for_crash_test(staging: Path) -> None:
    marker = os.environ.get(CRASH_TEST_PAUSE_ENV)
    if not marker:
        return
    Path(marker).write_text(str(staging))
    time.sleep(600)  # the test SIGKILLs this process here
    raise TimeoutError(f"{CRASH_TEST_PAUSE_ENV} is set but nobody killed the process within 600 s")


def write_atomically(directory: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging)`` in a temp sibling of ``directory``, fsync everything, then rename into place."""
    return atomic_replace_dir(directory, write)


def _metadata(components: TrainingComponents, state: TrainingState) -> dict[str, Any]:
    config = components.config
    return {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "weight_version": state.weight_version,
        "tokens_seen": state.tokens_seen,
        "grad_norm": state.grad_norm,
        "kind": "lora" if components.is_lora else "full",
        "base_model": components.base_model,
        "fingerprint": config.fingerprint(),
        "fingerprint_version": FINGERPRINT_VERSION,
        "fingerprint_fields": config.fingerprint_fields(),
        "config": config.to_json(),
    }


def save_checkpoint(components: TrainingComponents, state: TrainingState, directory: Path) -> TrainingState:
    """Write weights, optimizer state and metadata (with ``components.config``) atomically to ``directory``;
    returns ``state``."""
    from safetensors.torch import save_file, save_model

    def write(staging: Path) -> None:
        if components.is_lora:
            from peft import get_peft_model_state_dict

            adapter = {
                key: value.contiguous() for key, value in get_peft_model_state_dict(components.model).items()
            }
            save_file(adapter, str(staging / ADAPTER_FILE), metadata={"format": "pt"})
            peft_config = cast(Any, components.model).peft_config["default"]
            adapter_config = peft_config.to_dict()
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
            (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        else:
            save_model(components.model, str(staging / FULL_FILE), metadata={"format": "pt"})
        torch.save(components.optimizer.state_dict(), staging / OPTIMIZER_FILE)
        _pause_for_crash_test(staging)
        (staging / METADATA_FILE).write_text(json.dumps(_metadata(components, state), indent=2))

    write_atomically(Path(directory), write)
    components.checkpoint_dir = Path(directory)
    return state


def read_metadata(directory: Path) -> dict[str, Any]:
    """The ``metadata.json`` of a complete checkpoint."""
    return json.loads((Path(directory) / METADATA_FILE).read_text())  # type: ignore[no-any-return]


def checkpoint_steps(checkpoints_dir: Path) -> list[int]:
    """Steps with a complete checkpoint under ``checkpoints_dir`` (temp and half-written dirs ignored), sorted."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        int(path.name)
        for path in checkpoints_dir.iterdir()
        if _STEP_DIR.match(path.name) and (path / METADATA_FILE).is_file()
    )


def remove_stale_temporaries(checkpoints_dir: Path) -> list[Path]:
    """Delete ``.tmp-*``/``.old-*`` leftovers of interrupted writes; returns what was removed."""
    return durable_remove_stale_temporaries(checkpoints_dir)


def fingerprint_matches(metadata: Mapping[str, Any], config: TrainerConfig) -> bool:
    """Whether a checkpoint's fingerprint is ``config``'s; one written before ``FINGERPRINT_VERSION`` 2 holds the
    legacy fingerprint, and is compared with that (it resumes exactly where the code that wrote it resumed)."""
    if metadata.get("fingerprint_version") is None:
        return metadata.get("fingerprint") == config.legacy_fingerprint()
    return metadata.get("fingerprint") == config.fingerprint()


def config_differences(metadata: Mapping[str, Any], config: TrainerConfig) -> str:
    """``name: saved → now`` for each fingerprinted field the checkpoint and ``config`` disagree on."""
    saved: Mapping[str, Any] = metadata.get("fingerprint_fields") or {}
    now = config.fingerprint_fields()
    names = sorted(set(saved) | set(now)) if metadata.get("fingerprint_version") else sorted(saved)
    missing = "(not recorded)"
    changes = [
        f"{name}: {saved.get(name, missing)!r} → {now.get(name, missing)!r}"
        for name in names
        if saved.get(name, missing) != now.get(name, missing)
    ]
    return "; ".join(changes) or "no recorded field differs"


def check_compatible(
    metadata: Mapping[str, Any], components: TrainingComponents, directory: Path, *, allow: bool
) -> None:
    """Raise unless the checkpoint fits these components and (unless ``allow``) their config's fingerprint."""
    config = components.config
    kind = "lora" if components.is_lora else "full"
    if metadata.get("kind") != kind:
        raise CheckpointMismatchError(
            f"checkpoint {directory} holds {metadata.get('kind')} weights but this trainer is {kind}; "
            "use the same lora_rank setting (None = full fine-tune) or another model name"
        )
    if metadata.get("base_model") != components.base_model and not allow:
        raise CheckpointMismatchError(
            f"checkpoint {directory} was trained from base_model {metadata.get('base_model')!r} but this run loads "
            f"{components.base_model!r}; pass allow_config_mismatch=True if it is the same model in another place, "
            "or use another model name"
        )
    if not fingerprint_matches(metadata, config) and not allow:
        raise CheckpointMismatchError(
            f"checkpoint {directory} was written with another TrainerConfig ({config_differences(metadata, config)}; "
            f"fingerprint {metadata.get('fingerprint')}, this run's {config.fingerprint()}); use the same "
            "TrainerConfig, pass allow_config_mismatch=True to resume anyway, or use another model name"
        )


# How an optimizer runs, not what it learned: a checkpoint written with other kernels (say, before AdamW was
# fused, or on another device) loads with this optimizer's own.
_KERNEL_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def with_kernel_flags(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``state`` (an optimizer state dict) with ``optimizer``'s kernel choices in its parameter groups."""
    live_groups = optimizer.param_groups
    groups = [  # a different number of groups is left for load_state_dict to refuse
        {**saved, **{flag: live_groups[i][flag] for flag in _KERNEL_FLAGS if flag in live_groups[i]}}
        if i < len(live_groups)
        else saved
        for i, saved in enumerate(state["param_groups"])
    ]
    return {**state, "param_groups": groups}


def load_checkpoint(
    components: TrainingComponents, directory: Path, *, allow_config_mismatch: bool = False
) -> TrainingState:
    """Load weights and optimizer state from ``directory``; returns the state it was saved with.

    The components' ``TrainerConfig`` must have the checkpoint's fingerprint unless ``allow_config_mismatch``;
    its AdamW settings win over the saved ones either way."""
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    metadata = read_metadata(directory)
    check_compatible(metadata, components, directory, allow=allow_config_mismatch)
    try:
        if components.is_lora:
            load_weights(components, load_file(str(directory / ADAPTER_FILE), device=str(components.device)))
        else:
            load_model(
                components.model, str(directory / FULL_FILE), strict=True, device=str(components.device)
            )
        optimizer_state = torch.load(
            directory / OPTIMIZER_FILE, map_location=components.device, weights_only=True
        )
        components.optimizer.load_state_dict(with_kernel_flags(optimizer_state, components.optimizer))
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointMismatchError(f"checkpoint {directory} does not fit this model: {error}") from error
    config = components.config
    for group in components.optimizer.param_groups:  # this run's optimizer settings win over the saved ones
        group.update(betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    components.checkpoint_dir = directory
    return TrainingState(
        step=int(metadata["step"]),
        weight_version=int(metadata["weight_version"]),
        tokens_seen=int(metadata["tokens_seen"]),
        grad_norm=float(metadata.get("grad_norm", 0.0)),
    )

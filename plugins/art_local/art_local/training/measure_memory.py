"""Measure the peak memory of one training step on CPU, in a fresh process per setting.

``python -m art_local.training.measure_memory '{"model_dir": ..., "rows": 1, "sequence_length": 512,
"trainer_config": {"lora_rank": 8, "activation_checkpointing": true}}'`` prints one JSON line: the resident
memory before loading, after loading, and at the peak of one forward/backward (plus the optimizer step unless
``"optimizer_step": false``). The peak counter is reset after loading (``/proc/self/clear_refs``), so the
loader's transient copies do not hide the step's own peak; ``ru_maxrss`` is that peak.
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from art_local.training.batch import TrainBatch
from art_local.training.logprobs import causal_lm


def resident_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line; measure_memory needs Linux")


def release_free_heap() -> None:
    """Give the heap that loading freed back to the OS (glibc ``malloc_trim``), so that the step's allocations
    raise RSS instead of silently reusing it; a no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (False where /proc does not allow it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_bytes() -> int:
    """Peak resident set size since the last reset (``getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_batch(rows: int, sequence_length: int, vocab_size: int, seed: int = 0) -> TrainBatch:
    """``rows`` rows of one full-length sequence each, every token after the first trained, advantage 1."""
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, sequence_length)
    tokens_BT = torch.randint(0, vocab_size, shape, generator=generator)
    loss_mask_BT = torch.ones(shape, dtype=torch.bool)
    loss_mask_BT[:, 0] = False
    return TrainBatch(
        tokens_BT=tokens_BT,
        position_ids_BT=torch.arange(sequence_length).expand(shape).clone(),
        segment_ids_BT=torch.ones(shape, dtype=torch.long),
        prefix_segment_ids_BT=torch.zeros(shape, dtype=torch.long),
        loss_mask_BT=loss_mask_BT,
        old_logprobs_BT=torch.full(shape, -1.0),
        advantages_BT=torch.ones(shape),
        weights_BT=torch.ones(shape),
        sequence_index_BT=torch.arange(rows)[:, None].expand(shape).clone(),
    )


def save_random_model(directory: Path, **config: Any) -> Path:
    """A random-init Llama-style causal LM with ``config`` (e.g. ``hidden_size=1024``) saved in ``directory``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


def measure(request: dict[str, Any]) -> dict[str, Any]:
    """Load ``request["model_dir"]`` with ``request["trainer_config"]`` and run one step with ``request["step"]``
    (``StepConfig`` fields); the RSS figures."""
    from art_local.training import (
        StepConfig,
        TrainerConfig,
        TrainingState,
        build_components,
        forward_backward,
        optim_step,
    )

    torch.set_num_threads(int(request.get("threads", 2)))
    before_load = resident_bytes()
    config = TrainerConfig(**request.get("trainer_config", {}))
    step = StepConfig(**request.get("step", {}))
    components = build_components(request["model_dir"], config, device="cpu")
    vocab_size = int(causal_lm(components.model).config.vocab_size)  # type: ignore[union-attr, arg-type]
    batch = synthetic_batch(int(request["rows"]), int(request["sequence_length"]), vocab_size)
    with torch.no_grad():  # fp32 weights may stay memory-mapped from safetensors: page them in first
        for parameter in components.model.parameters():
            parameter.sum()
    gc.collect()
    release_free_heap()
    loaded = resident_bytes()
    was_reset = reset_peak()
    metrics = forward_backward(components, batch, step)
    if request.get("optimizer_step", True):
        optim_step(components, TrainingState(), learning_rate=step.learning_rate)
    peak = peak_bytes()
    return {
        "before_load_bytes": before_load,
        "loaded_bytes": loaded,
        "peak_bytes": peak,
        "peak_reset": was_reset,
        "step_growth_bytes": peak - loaded,
        "training_bytes": peak - before_load,
        "loss": metrics["loss/train"],
    }


def main() -> None:
    print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()

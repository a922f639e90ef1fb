"""What the CPU computes natively, from the flags it reports, and the compute dtype ``dtype="auto"`` picks.

bf16 matmuls are fast only where the CPU has bf16 instructions (AVX512-BF16, or AMX tiles): there autocast to
bf16 (trainable weights stay fp32) runs ~2-3x faster than fp32. Elsewhere (e.g. AVX2-only CPUs) torch emulates
bf16 and it is several times *slower* than fp32, so a CPU that does not report those flags never gets bf16 by
default. ``ART_CPU_FLAGS`` replaces what ``/proc/cpuinfo`` says (a space-separated flags list), for tests and for
machines whose hypervisor hides flags.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
FLAGS_ENV = "ART_CPU_FLAGS"
CPUINFO = Path("/proc/cpuinfo")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor listed in ``cpuinfo`` (the text of ``/proc/cpuinfo``)."""
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() in ("flags", "Features"):  # x86, arm64
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags: ``ART_CPU_FLAGS`` if set, else ``/proc/cpuinfo``'s (empty where unreadable)."""
    override = os.environ.get(FLAGS_ENV)
    if override is not None:
        return frozenset(override.split())
    try:
        return parse_cpu_flags(CPUINFO.read_text(errors="replace"))
    except OSError:  # not Linux: no flags known, so no bf16 by default
        return frozenset()


def has_native_bf16(flags: Iterable[str] | None = None) -> bool:
    """True when ``flags`` (default: this CPU's) include AVX512-BF16 or AMX-BF16."""
    return not BF16_FLAGS.isdisjoint(cpu_flags() if flags is None else flags)


def cpu_compute_dtype(flags: Iterable[str] | None = None) -> Literal["bfloat16", "float32"]:
    """The name of the dtype ``auto`` computes in on this CPU (or one with ``flags``)."""
    return "bfloat16" if has_native_bf16(flags) else "float32"


def auto_dtype(device: torch.device) -> torch.dtype:
    """What ``dtype="auto"`` means on ``device``: bf16 on CUDA and on CPUs with native bf16, else fp32."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_compute_dtype() == "bfloat16":
        return torch.bfloat16
    return torch.float32

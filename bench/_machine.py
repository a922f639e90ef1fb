"""What the benchmarks print about the machine their figures come from (stdlib + art_local only)."""

from __future__ import annotations


def cpu_description() -> str:
    """The CPU's model name and whether it reports native bf16 (the figures depend on both)."""
    from art_local.cpu_features import cpu_flags, has_native_bf16

    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
    except OSError:
        text = ""
    name = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?"
    )
    return f"{name} (native bf16: {has_native_bf16()}, amx: {'amx_bf16' in cpu_flags()})"

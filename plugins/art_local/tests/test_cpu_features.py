"""dtype="auto" on CPU: bf16 only where the CPU reports native bf16 (AMX / AVX512-BF16), fp32 everywhere else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from art_local import cpu_features
from art_local.cpu_features import cpu_compute_dtype, has_native_bf16, parse_cpu_flags
from art_local.training.state import resolve_dtype

AVX2_ONLY = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n\nprocessor\t: 1\n"
)
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


@pytest.fixture
def flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Set ``ART_CPU_FLAGS`` through the returned monkeypatch; the cached flags are dropped around the test."""
    cpu_features.cpu_flags.cache_clear()
    yield monkeypatch
    cpu_features.cpu_flags.cache_clear()


def test_flags_are_read_from_the_first_processor() -> None:
    assert parse_cpu_flags(AVX2_ONLY) == {"fpu", "sse", "sse2", "avx", "avx2", "fma", "f16c"}
    assert parse_cpu_flags("") == frozenset()


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (AVX2_ONLY, "float32"),
        (SAPPHIRE_RAPIDS, "bfloat16"),
        ("flags : avx512f avx512_bf16\n", "bfloat16"),  # Cooper Lake / Zen 4: AVX512-BF16 without AMX
        ("flags : avx512f avx512_fp16\n", "float32"),  # fp16 instructions are not bf16 ones
    ],
)
def test_bf16_only_with_native_bf16_flags(cpuinfo: str, expected: str) -> None:
    assert cpu_compute_dtype(parse_cpu_flags(cpuinfo)) == expected


def test_auto_follows_the_reported_flags(flags: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    flags.setenv(cpu_features.FLAGS_ENV, "avx2 fma")
    assert resolve_dtype("auto", cpu) == torch.float32
    cpu_features.cpu_flags.cache_clear()
    flags.setenv(cpu_features.FLAGS_ENV, "avx2 amx_bf16")
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("float32", cpu) == torch.float32  # an explicit dtype always wins


def test_this_machine_gets_bf16_by_default_only_if_its_cpu_has_it(flags: pytest.MonkeyPatch) -> None:
    flags.delenv(cpu_features.FLAGS_ENV, raising=False)
    expected = torch.bfloat16 if has_native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected

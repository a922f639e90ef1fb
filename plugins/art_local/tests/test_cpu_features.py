"""dtype="auto" on CPU: bf16 only where the CPU reports native bf16 (AMX / AVX512-BF16), fp32 everywhere else."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from art_local import cpu_features
from art_local.cpu_features import cpu_compute_dtype, has_native_bf16, parse_cpu_flags
from art_local.training import PackSequence, TrainerConfig, build_components, compute_logprobs, pack_sequences
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


def _native_flags(flags: pytest.MonkeyPatch) -> None:
    """Undo the suite's fp32 pin (the repository's conftest.py): the flags this CPU really reports."""
    native = os.environ.get("ART_TEST_NATIVE_CPU_FLAGS", "unset")
    if native == "unset":
        flags.delenv(cpu_features.FLAGS_ENV, raising=False)
    else:
        flags.setenv(cpu_features.FLAGS_ENV, native)
    cpu_features.cpu_flags.cache_clear()


def test_this_machine_gets_bf16_by_default_only_if_its_cpu_has_it(flags: pytest.MonkeyPatch) -> None:
    _native_flags(flags)
    expected = torch.bfloat16 if has_native_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expected


def test_native_bf16_logprobs_stay_within_the_stated_bound_of_fp32(
    flags: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    """Where the CPU has native bf16, ``auto`` trains in bf16 autocast; its logprobs stay within 0.1 of fp32's."""
    _native_flags(flags)
    if not has_native_bf16():
        pytest.skip("this CPU reports no native bf16 (AMX / AVX512-BF16): auto is fp32 here")
    ids = tuple(range(3, 40))
    batch = pack_sequences([PackSequence(ids, (False,) * 8 + (True,) * 29, (-1.0,) * 37)], capacity=64)
    auto = build_components(tiny_model_dir, TrainerConfig(lora_rank=4), device="cpu")
    fp32 = build_components(tiny_model_dir, TrainerConfig(lora_rank=4, dtype="float32"), device="cpu")
    assert auto.compute_dtype == torch.bfloat16 and fp32.compute_dtype == torch.float32
    native, reference = compute_logprobs(auto, batch), compute_logprobs(fp32, batch)
    trained = ~torch.isnan(reference)
    assert int(trained.sum()) == 29
    assert float((native[trained] - reference[trained]).abs().max()) < 0.1

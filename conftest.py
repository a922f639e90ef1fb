"""Suite-wide: tests compute in fp32 on CPU, whatever this machine's CPU offers.

``dtype="auto"`` picks bf16 on CPUs with native bf16 (AMX / AVX512-BF16; ``art_local.cpu_features``), and many
tests compare two computations to 1e-5, which holds in fp32 only. So, unless ``ART_CPU_FLAGS`` is already set,
the suite runs with it empty (no native bf16 reported: fp32) and the result does not depend on which machine
CI draws. The tests of the bf16 path itself (``plugins/art_local/tests/test_cpu_features.py``) restore the
flags the CPU really reports, from ``ART_TEST_NATIVE_CPU_FLAGS``.
"""

from __future__ import annotations

import os

if "ART_CPU_FLAGS" not in os.environ:
    os.environ["ART_TEST_NATIVE_CPU_FLAGS"] = "unset"  # read /proc/cpuinfo
    os.environ["ART_CPU_FLAGS"] = ""  # subprocesses (servers, torchrun workers) inherit it
else:
    os.environ["ART_TEST_NATIVE_CPU_FLAGS"] = os.environ["ART_CPU_FLAGS"]

"""Giving back a thread's idle OpenMP workers (the pools that otherwise slow every other thread's ops)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="libgomp pools are a Linux matter"
)

SCRIPT = textwrap.dedent(
    """
    import os, threading
    import torch
    from art_local.openmp import release_openmp_workers, releasing_openmp_workers

    def threads():
        return len(os.listdir("/proc/self/task"))

    def work():
        torch.set_num_threads(2)
        x = torch.randn(600, 600)
        (x @ x).sum()

    counts = []

    def run():
        work()
        counts.append(threads())  # this thread's pool holds one worker
        assert release_openmp_workers()
        counts.append(threads())
        work()  # a new pool starts on demand
        counts.append(threads())
        releasing_openmp_workers(work)()
        counts.append(threads())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    print(*counts)
    """
)


def test_a_thread_gives_its_openmp_workers_back_and_gets_new_ones_on_demand() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ART_KEEP_OPENMP_WORKERS"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    working, released, again, released_again = map(int, done.stdout.split())
    assert released == working - 1  # the pool's worker thread ended
    assert again == working and released_again == released


def test_turned_off_by_the_environment() -> None:
    script = (
        "import torch\nfrom art_local.openmp import release_openmp_workers\nprint(release_openmp_workers())"
    )
    env = {"ART_KEEP_OPENMP_WORKERS": "1", "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_call_before_torch_is_imported_does_not_turn_it_off() -> None:
    script = (
        "import sys\nfrom art_local.openmp import release_openmp_workers\n"
        "before = release_openmp_workers()\nassert 'torch' not in sys.modules\n"
        "import torch\nprint(before, release_openmp_workers())"
    )
    env = {k: v for k, v in os.environ.items() if k != "ART_KEEP_OPENMP_WORKERS"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]

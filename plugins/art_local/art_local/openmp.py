"""Give back a thread's idle OpenMP workers, so the thread that computes next runs at full speed.

PyTorch's CPU kernels run on GNU OpenMP (libgomp), which keeps one pool of worker threads per thread that ever
ran a parallel op, for as long as that thread lives. libgomp decides how its workers wait at a barrier from the
process's total: while the workers of *all* pools (idle ones included) outnumber the cores, a waiting worker
sleeps in the kernel instead of spinning, and every op pays a wake-up. A backend that samples on one thread and
trains on another therefore ran both slower even when only one of them worked. Measured on the 18M model,
2 cores, 8 x 32 sampled tokens: 0.80 s with the trainer's pool kept, 0.50 s with it given back.

``release_openmp_workers()`` ends the calling thread's pool (``omp_pause_resource_all``); its next parallel op
starts a new one, which costs a thread start (tens of microseconds). Call it where a thread stops computing for
a while: the sampler when its queue runs dry, the trainer's thread after each job. It touches only the calling
thread's pool in libgomp; other OpenMP runtimes pause process-wide, so it does nothing there.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

_P = ParamSpec("_P")
_T = TypeVar("_T")

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep nothing that must be re-read


_UNSET: Any = object()
_found: Any = _UNSET  # the function once looked up for good (None: there is none to call)


def _pause_all() -> Callable[[int], int] | None:
    """libgomp's ``omp_pause_resource_all`` as loaded by torch, or None where there is none to call.

    Until torch is imported a miss is not final (torch loads libgomp), so it is looked up again next time.
    """
    global _found
    if _found is not _UNSET:
        return cast("Callable[[int], int] | None", _found)
    if not sys.platform.startswith("linux") or os.environ.get("ART_KEEP_OPENMP_WORKERS"):
        _found = None
        return None
    torch = sys.modules.get("torch")
    path = _loaded_libgomp(Path(torch.__file__).parent if torch is not None and torch.__file__ else None)
    if path is None:
        if torch is not None:
            _found = None
        return None
    try:
        function = ctypes.CDLL(path).omp_pause_resource_all  # the loaded copy: dlopen by path reuses it
    except (OSError, AttributeError):  # libgomp older than OpenMP 5.0 (GCC 9)
        _found = None
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    _found = function
    return cast("Callable[[int], int]", function)


def _loaded_libgomp(torch_dir: Path | None) -> str | None:
    """Path of the libgomp mapped into this process: torch's own copy if it has one, else the one there is;
    None when none (or several, none of them torch's) is mapped."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    fields = (line.split() for line in maps.splitlines())
    paths = sorted({f[-1] for f in fields if len(f) >= 6 and Path(f[-1]).name.startswith("libgomp")})
    if torch_dir is not None:
        own = [path for path in paths if Path(path).is_relative_to(torch_dir)]
        if own:
            return own[0]
    return paths[0] if len(paths) == 1 else None


def release_openmp_workers() -> bool:
    """End the calling thread's idle OpenMP worker pool; True if a libgomp was there to ask.

    Safe from any thread outside a parallel region (every Python thread is); a later parallel op on this thread
    starts a fresh pool. Set ``ART_KEEP_OPENMP_WORKERS=1`` to turn it off.
    """
    pause = _pause_all()
    if pause is None:
        return False
    return pause(OMP_PAUSE_SOFT) == 0


def releasing_openmp_workers(function: Callable[_P, _T]) -> Callable[_P, _T]:
    """``function``, followed on the same thread by ``release_openmp_workers()`` (also when it raises)."""

    @functools.wraps(function)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return function(*args, **kwargs)
        finally:
            release_openmp_workers()

    return run

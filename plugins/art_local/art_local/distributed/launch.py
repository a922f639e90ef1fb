"""Node 0's launcher: torchrun's elastic agent (``elastic_launch`` + ``LaunchConfig``) over the trainer workers.

``LocalBackend`` runs ``python -m art_local.distributed.launch --run-dir DIR --nproc-per-node N [--nnodes M
--master-addr A --master-port P]`` in its own session. One node: c10d rendezvous on a free local port (as
``torchrun --standalone``). Several nodes: static rendezvous at A:P with this node as node rank 0, so global rank 0
(the one that talks to the parent) runs here; the other nodes run plain ``torchrun`` with the same settings.
Workers are never restarted (``max_restarts=0``): when one fails, the agent stops the others and this process
writes ``DIR/failure.json`` (every failed rank, its exit code and the traceback from its torchrun error file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

from art_core.plugin_api import atomic_write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The launcher's command line."""
    parser = argparse.ArgumentParser(prog="python -m art_local.distributed.launch")
    parser.add_argument("--run-dir", required=True, help="where failure.json and torchrun's error files go")
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--rdzv-timeout", type=int, default=600, help="seconds to wait for every node")
    parser.add_argument("--shutdown-timeout", type=int, default=30, help="SIGTERM → SIGKILL grace, seconds")
    return parser.parse_args(argv)


def launch_config(args: argparse.Namespace) -> Any:
    """The ``LaunchConfig`` torchrun would build for these arguments (rendezvous as described above)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    if args.nnodes == 1:
        backend, endpoint, run_id, rdzv = "c10d", "localhost:0", uuid.uuid4().hex, {}
    else:
        backend, endpoint, run_id = "static", f"{args.master_addr}:{args.master_port}", "none"
        rdzv = {"rank": 0}
    return LaunchConfig(
        min_nodes=args.nnodes,
        max_nodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        run_id=run_id,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs={**rdzv, "timeout": args.rdzv_timeout},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(Path(args.run_dir) / "torchelastic")),
        shutdown_timeout=args.shutdown_timeout,
    )


def failure_report(failures: dict[int, Any]) -> dict[str, Any]:
    """JSON-ready facts about each failed rank (exit code, signal, message, traceback)."""
    ranks = {}
    for rank, failure in sorted(failures.items()):
        data = getattr(failure, "error_file_data", None) or {}
        message = data.get("message", {}) if isinstance(data, dict) else {}
        extra = message.get("extraInfo", {}) if isinstance(message, dict) else {}
        ranks[str(rank)] = {
            "exitcode": failure.exitcode,
            "signal": failure.signal_name() if failure.exitcode < 0 else None,
            "message": message.get("message") if isinstance(message, dict) else str(failure.message),
            "traceback": extra.get("py_callstack"),
            "timestamp": failure.timestamp,
            "pid": failure.pid,
        }
    return {"ranks": ranks}


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Write ``failure.json`` atomically and durably."""
    atomic_write_text(run_dir / "failure.json", json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Run the worker group to completion; 0 after a clean shutdown, 1 after a failure (report written)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun, but share the cores instead of one thread each
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc_per_node))
    try:
        elastic_launch(launch_config(args), sys.executable)("-u", "-m", "art_local.distributed.worker")
    except ChildFailedError as error:
        write_report(run_dir, failure_report(error.failures))
        return 1
    except BaseException as error:  # rendezvous timeout, a signal, a bad argument
        text = "".join(traceback.format_exception(error))
        write_report(
            run_dir, {"launcher": {"message": f"{type(error).__name__}: {error}", "traceback": text}}
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

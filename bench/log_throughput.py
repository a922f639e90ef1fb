"""Model.log throughput on two workloads, 200 groups × 8 trajectories × 10 messages; one JSON line.

Workloads: ``plain`` (chat message dicts, no logprobs) and ``choices`` (every assistant turn a Choice with 32
logprobs). With ``--vs-openpipe-art`` both sides run in the same process run, interleaved round by round
(openpipe-art in its own interpreter, kept alive between rounds), so machine load hits both alike; each figure
is the median over every round's repeats. A round's logs share one event loop, as in a training loop.

.venv/bin/python bench/log_throughput.py
# side by side with openpipe-art 0.5.18:
python3 -m venv ~/.cache/art/openpipe-venv && ~/.cache/art/openpipe-venv/bin/pip install openpipe-art==0.5.18 pyarrow  # its parquet writer needs pyarrow
.venv/bin/python bench/log_throughput.py --vs-openpipe-art ~/.cache/art/openpipe-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _log_batch import WORKLOADS, make_batch

HERE = Path(__file__).resolve().parent


def import_seconds(python: str, module: str) -> float:
    """Best of 3 fresh-interpreter imports of ``module``."""
    probe = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [
        float(
            subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()[
                -1
            ]
        )
        for _ in range(3)
    ]
    return min(runs)


class Ours:
    """Our side: groups built once per workload, one model whose steps count up across rounds."""

    def __init__(self, batches: dict[str, list[dict[str, Any]]], directory: str) -> None:
        import art_core as art

        self.groups = {
            name: [
                art.TrajectoryGroup(
                    [
                        art.Trajectory(
                            messages_and_choices=t["messages"], reward=t["reward"], metrics=t["metrics"]
                        )
                        for t in group["trajectories"]
                    ],
                    metadata=group["metadata"],
                )
                for group in batch
            ]
            for name, batch in batches.items()
        }
        if "choices" in self.groups:
            assert all(len(t.choices()) == 4 for g in self.groups["choices"] for t in g), (
                "choices must survive construction from JSON"
            )
        self.model = art.Model(name="bench", project="bench", base_path=directory, report_metrics=[])
        self.step = 0

    def run(self, workload: str, repeats: int) -> dict[str, Any]:
        return asyncio.run(self._run(workload, repeats))

    async def _run(self, workload: str, repeats: int) -> dict[str, Any]:
        times, size = [], 0
        for _ in range(repeats):
            started = time.perf_counter()
            await self.model.log(self.groups[workload], split="train", step=self.step)
            times.append(time.perf_counter() - started)
            size = (
                (self.model.output_dir() / "trajectories" / "train" / f"{self.step:04d}.parquet")
                .stat()
                .st_size
            )
            self.step += 1
        return {"times": times, "bytes": size}


class Theirs:
    """openpipe-art's side: one long-lived worker interpreter (``_openpipe_art_log.py``)."""

    def __init__(self, python: str, batches: dict[str, list[dict[str, Any]]]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(batches, handle)
        self.batch_path = handle.name
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
        self.process = subprocess.Popen(
            [python, str(HERE / "_openpipe_art_log.py"), self.batch_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.import_s = float(self._reply()["import_s"])

    def _reply(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("@@"):
                return dict(json.loads(line[2:]))
        raise RuntimeError(f"openpipe-art worker exited with {self.process.wait()} before replying")

    def run(self, workload: str, repeats: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{workload} {repeats}\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        os.unlink(self.batch_path)


def summary(side: str, runs: list[dict[str, Any]], count: int) -> dict[str, Any]:
    log_s = statistics.median(t for run in runs for t in run["times"])
    return {
        f"{side}_log_s": round(log_s, 4),
        f"{side}_trajectories_per_s": round(count / log_s, 1),
        f"{side}_bytes_written_per_log": int(runs[-1]["bytes"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32, help="sampled tokens (with logprobs) per Choice")
    parser.add_argument("--repeats", type=int, default=5, help="logs per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations between the two sides")
    parser.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both")
    parser.add_argument(
        "--vs-openpipe-art", metavar="VENV_PYTHON", help="interpreter with openpipe-art 0.5.18"
    )
    args = parser.parse_args()

    workloads = list(WORKLOADS) if args.workload == "both" else [args.workload]
    batches = {
        name: make_batch(args.groups, args.trajectories, args.messages, args.tokens, workload=name)
        for name in workloads
    }
    count = args.groups * args.trajectories
    theirs = Theirs(args.vs_openpipe_art, batches) if args.vs_openpipe_art else None
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        ours = Ours(batches, directory)
        for _ in range(args.rounds):
            for name in workloads:
                runs.setdefault(("ours", name), []).append(ours.run(name, args.repeats))
                if theirs is not None:
                    runs.setdefault(("openpipe_art", name), []).append(theirs.run(name, args.repeats))
    if theirs is not None:
        theirs.close()
    result: dict[str, Any] = {
        "benchmark": "log_throughput",
        "trajectories": count,
        "messages_per_trajectory": args.messages,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "ours_import_s": round(import_seconds(sys.executable, "art_core"), 4),
    }
    if theirs is not None:
        result["openpipe_art_import_s"] = round(theirs.import_s, 4)
    for name in workloads:
        row = summary("ours", runs["ours", name], count)
        if theirs is not None:
            row |= summary("openpipe_art", runs["openpipe_art", name], count)
            row["throughput_ratio_ours_over_openpipe_art"] = round(
                row["openpipe_art_log_s"] / row["ours_log_s"], 2
            )
        result[name] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()

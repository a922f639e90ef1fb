"""Model.log throughput: 200 groups × 8 trajectories × 10 messages with Choice logprobs; one JSON line.

.venv/bin/python bench/log_throughput.py
# side by side with openpipe-art 0.5.18 in its own interpreter, in the same run:
python3 -m venv /tmp/openpipe-venv && /tmp/openpipe-venv/bin/pip install openpipe-art==0.5.18 pyarrow numpy
.venv/bin/python bench/log_throughput.py --vs-openpipe-art /tmp/openpipe-venv/bin/python
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

from _log_batch import make_batch

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


def ours(batch: list[dict], repeats: int) -> dict[str, float]:
    import art_core as art

    groups = [
        art.TrajectoryGroup(
            [
                art.Trajectory(messages_and_choices=t["messages"], reward=t["reward"], metrics=t["metrics"])
                for t in group["trajectories"]
            ],
            metadata=group["metadata"],
        )
        for group in batch
    ]
    assert all(len(t.choices()) == 4 for g in groups for t in g), (
        "choices must survive construction from JSON"
    )
    with tempfile.TemporaryDirectory() as directory:
        model = art.Model(name="bench", project="bench", base_path=directory, report_metrics=[])
        times = []
        for step in range(repeats):
            started = time.perf_counter()
            asyncio.run(model.log(groups, split="train", step=step))
            times.append(time.perf_counter() - started)
        size = sum(f.stat().st_size for f in model.output_dir().rglob("*") if f.is_file())
    return {"log_s": statistics.median(times), "bytes": size // repeats}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32, help="sampled tokens (with logprobs) per Choice")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--vs-openpipe-art", metavar="VENV_PYTHON", help="interpreter with openpipe-art 0.5.18"
    )
    args = parser.parse_args()

    batch = make_batch(args.groups, args.trajectories, args.messages, args.tokens)
    count = args.groups * args.trajectories
    mine = ours(batch, args.repeats)
    result: dict[str, object] = {
        "benchmark": "log_throughput",
        "trajectories": count,
        "messages_per_trajectory": args.messages,
        "ours_log_s": round(mine["log_s"], 4),
        "ours_trajectories_per_s": round(count / mine["log_s"], 1),
        "ours_bytes_written_per_log": int(mine["bytes"]),
        "ours_import_s": round(import_seconds(sys.executable, "art_core"), 4),
    }
    if args.vs_openpipe_art:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(batch, handle)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
            out = (
                subprocess.run(
                    [
                        args.vs_openpipe_art,
                        str(HERE / "_openpipe_art_log.py"),
                        handle.name,
                        str(args.repeats),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
        finally:
            os.unlink(handle.name)
        theirs = json.loads(out)
        result |= {
            "openpipe_art_log_s": round(theirs["log_s"], 4),
            "openpipe_art_trajectories_per_s": round(count / theirs["log_s"], 1),
            "openpipe_art_bytes_written_per_log": int(theirs["bytes"]),
            "openpipe_art_import_s": round(theirs["import_s"], 4),
            "throughput_ratio_ours_over_openpipe_art": round(theirs["log_s"] / mine["log_s"], 2),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Runs inside openpipe-art's interpreter: times its Model.log on the shared batches, round by round.

Started once by ``log_throughput.py``: it prints ``{"import_s": ...}``, then for each ``WORKLOAD REPEATS`` line
on stdin logs that workload's batch ``REPEATS`` times and prints ``{"times": [...], "bytes": ...}``, so both
sides run interleaved under the same machine load. Every reply is one JSON line prefixed with ``@@``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any


def reply(payload: dict[str, Any]) -> None:
    print("@@" + json.dumps(payload), flush=True)


def build_groups(art: Any, choice_class: Any, batch: list[dict[str, Any]]) -> list[Any]:
    return [
        art.TrajectoryGroup(
            [
                art.Trajectory(
                    messages_and_choices=[
                        choice_class.model_validate(m) if "finish_reason" in m else m for m in t["messages"]
                    ],
                    reward=t["reward"],
                    metrics=t["metrics"],
                )
                for t in group["trajectories"]
            ],
            metadata=group["metadata"],
        )
        for group in batch
    ]


def main() -> None:
    probe = "import time; t = time.perf_counter(); import art; print(time.perf_counter() - t)"
    import_s = min(
        float(
            subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(3)
    )
    import art
    from openai.types.chat.chat_completion import Choice

    with open(sys.argv[1]) as handle:
        batches = json.load(handle)
    groups = {name: build_groups(art, Choice, batch) for name, batch in batches.items()}
    reply({"import_s": import_s})
    with tempfile.TemporaryDirectory() as directory:
        model = art.Model(name="bench", project="bench", base_path=directory, report_metrics=[])
        out = os.path.join(directory, "bench", "models", "bench", "trajectories", "train")
        steps = itertools.count()

        async def run(workload: str, repeats: int) -> dict[str, Any]:
            times, size = [], 0
            for _ in range(repeats):  # one event loop per round, as on our side
                step = next(steps)
                started = time.perf_counter()
                await model.log(groups[workload], split="train", step=step)
                times.append(time.perf_counter() - started)
                size = os.path.getsize(os.path.join(out, f"{step:04d}.parquet"))
            return {"times": times, "bytes": size}

        for line in sys.stdin:
            workload, repeats = line.split()
            reply(asyncio.run(run(workload, int(repeats))))


if __name__ == "__main__":
    main()

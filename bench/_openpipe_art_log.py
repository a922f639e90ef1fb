"""Runs inside openpipe-art's interpreter: time its Model.log on the shared batch; prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> None:
    batch_path, repeats = sys.argv[1], int(sys.argv[2])
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

    batch = json.load(open(batch_path))
    groups = [
        art.TrajectoryGroup(
            [
                art.Trajectory(
                    messages_and_choices=[
                        Choice.model_validate(m) if "finish_reason" in m else m for m in t["messages"]
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
    with tempfile.TemporaryDirectory() as directory:
        model = art.Model(name="bench", project="bench", base_path=directory, report_metrics=[])
        times = []
        for step in range(repeats):
            started = time.perf_counter()
            asyncio.run(model.log(groups, split="train", step=step))
            times.append(time.perf_counter() - started)
        out = os.path.join(directory, "bench", "models", "bench")
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(out) for f in files)
    print(json.dumps({"log_s": statistics.median(times), "import_s": import_s, "bytes": size // repeats}))


if __name__ == "__main__":
    main()

"""Benchmark: the inference server under load — completion tokens/s and p99 latency at 1, 32, 128, 256 in flight.

The soak test's harness (``art_core.testing.load``), shortened and made uniform: every request asks for exactly
32 tokens (``ignore_eos``), n=1, temperature 1, no cancellations, through the real HTTP server on 127.0.0.1. A
change that serialises requests shows up here as tokens/s that stop growing with concurrency. Prints ONE JSON
line.

    .venv/bin/python bench/serving_load.py [--size small] [--concurrency 1 32 128 256] [--engine hf]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

from _machine import cpu_description


async def bench(size: str, levels: list[int], engine: str, tokens: int) -> dict[str, Any]:
    from art_core.testing.load import LoadPlan, run_load
    from art_local.inference.service import InferenceService
    from art_local.tiny import build_tiny_model

    service = InferenceService(engine=engine, device="cpu")  # type: ignore[arg-type]
    results: dict[str, Any] = {}
    try:
        model_dir = build_tiny_model(size)  # type: ignore[arg-type]
        await service.add_model("bench", base_model=model_dir, step=0, weights=None, load_step=lambda s: None)
        for concurrency in levels:
            plan = LoadPlan(
                requests=max(2 * concurrency, 16),
                waves=(concurrency,),
                max_tokens=(tokens, tokens),
                n=(1,),
                temperatures=(1.0,),
                prompt_words=(8, 8),
                stop_fraction=0.0,
                cancel_fraction=0.0,
                ignore_eos=True,
                request_timeout_s=600.0,
            )
            report = await run_load(
                plan, base_url=service.base_url, api_key=service.api_key, models=["bench"]
            )
            if report.problems():
                raise RuntimeError(f"c={concurrency}: {report.problems()}")
            summary = report.summary()
            results[str(concurrency)] = {
                k: summary[k] for k in ("tokens_per_s", "p50_s", "p99_s", "tried", "wall_s")
            }
    finally:
        await service.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128, 256])
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    results = asyncio.run(bench(args.size, args.concurrency, args.engine, args.tokens))
    line = {
        "benchmark": "serving_load",
        "size": args.size,
        "engine": args.engine,
        "completion_tokens": args.tokens,
        "by_concurrency": results,
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()

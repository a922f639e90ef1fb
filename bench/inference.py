"""Benchmark: completion tokens/s of art_local's inference server at concurrency 1, 8 and 32.

Each request asks for exactly 64 completion tokens (``ignore_eos``) through the real HTTP server with the
``openai`` AsyncOpenAI client, on the offline ``tiny`` (~0.2M) and ``small`` (~18M) models. Prints ONE JSON line.

    .venv/bin/python bench/inference.py [--sizes tiny small] [--concurrency 1 8 32] [--cpu-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from typing import Any, Literal

COMPLETION_TOKENS = 64


async def _run_level(
    client: Any, engine: Any, model: str, concurrency: int, requests_per_worker: int
) -> dict[str, float]:
    """``concurrency`` workers each send ``requests_per_worker`` requests back to back."""
    produced = 0
    batches_before = engine.batches_run

    async def worker(index: int) -> None:
        nonlocal produced
        for r in range(requests_per_worker):
            response = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Sort these letters: c a b ({index}.{r})"}],
                max_tokens=COMPLETION_TOKENS,
                temperature=1.0,
                logprobs=True,
                extra_body={"ignore_eos": True},
            )
            assert response.usage is not None
            assert response.usage.completion_tokens == COMPLETION_TOKENS
            produced += response.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    batches = engine.batches_run - batches_before
    return {
        "tokens_per_s": round(produced / elapsed, 1),
        "seconds": round(elapsed, 2),
        "tokens": produced,
        "requests": concurrency * requests_per_worker,
        "batches": batches,
    }


async def _bench_size(
    size: Literal["tiny", "small"], levels: list[int], cpu_threads: int | None, rounds: int, min_requests: int
) -> dict[str, Any]:
    from openai import AsyncOpenAI

    from art_local.inference.service import InferenceService
    from art_local.tiny import build_tiny_model

    service = InferenceService(engine="hf", cpu_threads=cpu_threads)
    await service.add_model(
        size, base_model=build_tiny_model(size), step=0, weights=None, load_step=lambda s: None
    )
    client = AsyncOpenAI(base_url=service.base_url, api_key=service.api_key, max_retries=0, timeout=600)
    try:
        engine = service.engine
        await _run_level(client, engine, size, 2, 1)  # warm-up: first-call allocations, tokenizer caches
        results = {
            f"c{c}": await _run_level(client, engine, size, c, max(rounds, -(-min_requests // c)))
            for c in levels
        }
    finally:
        await client.close()
        await service.close()
    figures: dict[str, Any] = {k: v["tokens_per_s"] for k, v in results.items()}
    if "c1" in results and f"c{max(levels)}" in results:
        figures[f"speedup_c{max(levels)}_over_c1"] = round(
            results[f"c{max(levels)}"]["tokens_per_s"] / results["c1"]["tokens_per_s"], 2
        )
    figures["detail"] = results
    return figures


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bench": "inference",
        "completion_tokens_per_request": COMPLETION_TOKENS,
        "engine": "hf",
        "cpu_threads": args.cpu_threads,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.machine(),
            "load_avg_1m": os.getloadavg()[0],
        },
    }
    for size in args.sizes:
        out[size] = await _bench_size(
            size, args.concurrency, args.cpu_threads, args.rounds, args.min_requests
        )
    if "small" in out and "speedup_c32_over_c1" in out["small"]:
        out["target_small_c32_ge_6x_c1"] = out["small"]["speedup_c32_over_c1"] >= 6.0
    out["machine"]["load_avg_1m_after"] = os.getloadavg()[0]
    return out


def main() -> None:
    """Parse options, run the benchmark, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per concurrent worker (at least)")
    parser.add_argument(
        "--min-requests", type=int, default=8, help="requests per concurrency level (at least)"
    )
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch threads of the sampling thread")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    print(json.dumps(asyncio.run(_main(args))), flush=True)


if __name__ == "__main__":
    main()

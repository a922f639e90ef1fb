"""Soak: 2,000 varied requests, concurrency 1 to 256, ~10 % abandoned mid-flight, two served steps at once.

Bounded: every request has a deadline, the plan is a fixed list, and all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from art_core.testing.load import LoadPlan, check_keep_alive, run_load, summary_line
from art_local.inference.hf import HFEngine
from art_local.inference.service import InferenceService

pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]


def rss_mb() -> float:
    """This process's resident memory, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def other_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    generator = torch.Generator().manual_seed(1)
    state["lm_head.weight"] = torch.randn(state["lm_head.weight"].shape, generator=generator) * 0.5
    return state


async def test_transformers_engine_soak(tiny_model_dir: Path) -> None:
    service = InferenceService(engine="hf", device="cpu")
    try:
        await service.add_model(
            "agent", base_model=tiny_model_dir, step=0, weights=None, load_step=lambda s: None
        )
        await service.publish("agent", 1, other_weights(tiny_model_dir))
        engine = service.engine
        assert isinstance(engine, HFEngine)
        models = ["agent", "agent@0", "agent@1"]
        warm = LoadPlan(requests=100, waves=(64,), seed=1)
        await run_load(warm, base_url=service.base_url, api_key=service.api_key, models=models)
        threads_before, rss_before = threading.active_count(), rss_mb()

        report = await run_load(LoadPlan(), base_url=service.base_url, api_key=service.api_key, models=models)

        deadline = time.monotonic() + 15
        while engine.pending_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(
            summary_line(
                "transformers engine, tiny",
                report,
                rows_dropped=engine.rows_dropped,
                threads=[threads_before, threading.active_count()],
                rss_mb=[round(rss_before), round(rss_mb())],
                cpus=os.cpu_count(),
            )
        )
        assert not report.problems(), report.problems()
        await check_keep_alive(
            service.base_url, service.api_key
        )  # idle connections outlive the client's pool expiry
        assert report.answered + report.cancelled == report.tried >= 2000
        assert report.cancelled >= 100 and report.max_in_flight == 256
        assert engine.pending_requests() == 0, "requests were left in the engine's queue"
        assert threading.active_count() <= threads_before + 4, "threads grew with the load"
        assert rss_mb() - rss_before < 1024, f"RSS grew from {rss_before:.0f} to {rss_mb():.0f} MB"
    finally:
        await service.close()

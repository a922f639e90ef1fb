"""Soak through Tinker: the backend's OpenAI endpoint samples through the real SDK from the loopback server.

Bounded: a fixed list of requests, each with a deadline, concurrency up to 256, all traffic on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tinker_harness import Server, rollout_groups

import art_core as art
from art_core.testing.load import LoadPlan, check_keep_alive, run_load, summary_line
from art_tinker import TinkerBackend

pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]


async def test_tinker_sampling_soak(tmp_path: Path, server: Server, tiny_model: str) -> None:
    backend = TinkerBackend(api_key=server.api_key, base_url=server.base_url, lora_rank=4)
    model = art.TrainableModel(
        name="soak", project="tinker-soak", base_model=tiny_model, base_path=str(tmp_path), report_metrics=[]
    )
    try:
        await model.register(backend)
        groups = await rollout_groups(model, ["Sort these letters: c a b"])
        await backend.train(model, groups, learning_rate=1e-3)  # a second served step: soak@0 and soak@1
        assert model.inference_base_url is not None and model.inference_api_key is not None
        plan = LoadPlan(requests=500, waves=(1, 16, 64, 256, 32), max_tokens=(1, 32), seed=2)
        names = [model.get_inference_name(), model.get_inference_name(0), model.get_inference_name(1)]
        report = await run_load(
            plan, base_url=model.inference_base_url, api_key=model.inference_api_key, models=names
        )
        print(summary_line("tinker loopback via TinkerBackend's endpoint", report))
        assert not report.problems(), report.problems()
        await check_keep_alive(
            model.inference_base_url, model.inference_api_key
        )  # idle connections outlive the client's pool expiry
        assert report.answered + report.cancelled == report.tried >= 500
        assert report.cancelled >= 20 and report.max_in_flight == 256
    finally:
        await backend.close()

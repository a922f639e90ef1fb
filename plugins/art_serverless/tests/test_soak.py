"""Soak through a self-hosted serverless server: its /v1/chat/completions relays to the hosted LocalBackend.

Bounded: a fixed list of requests, each with a deadline, concurrency up to 256, all traffic on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_e2e_local import KEY, art_serve, rollout

import art_core as art
from art_core.testing.load import LoadPlan, check_keep_alive, run_load, summary_line
from art_serverless import ServerlessBackend

pytest.importorskip("art_local.backend")
pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]


async def test_serverless_relay_soak(tmp_path: Path) -> None:
    from art_local.tiny import build_tiny_model

    data_dir, key_file = tmp_path / "server", tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    server = art_serve(data_dir, key_file).start()
    try:
        backend = ServerlessBackend(KEY, server.url, poll_interval=0.2, no_progress_timeout=300)
        model = art.TrainableModel(
            name="soak",
            project="serverless",
            base_model=str(build_tiny_model("tiny")),
            base_path=str(tmp_path / "client"),
            report_metrics=[],
        )
        await model.register(backend)
        groups = [art.TrajectoryGroup([await rollout(model, "count"), await rollout(model, "count to")])]
        await backend.train(model, groups, learning_rate=1e-3)  # two served steps: :step0 and :step1
        assert model.inference_base_url is not None and model.inference_api_key is not None
        plan = LoadPlan(requests=600, waves=(1, 16, 64, 256, 32), seed=3)
        names = [model.get_inference_name(), model.get_inference_name(0), model.get_inference_name(1)]
        report = await run_load(
            plan, base_url=model.inference_base_url, api_key=model.inference_api_key, models=names
        )
        print(summary_line("serverless relay to LocalBackend", report))
        assert not report.problems(), report.problems()
        await check_keep_alive(
            model.inference_base_url, model.inference_api_key
        )  # idle connections outlive the client's pool expiry
        assert report.answered + report.cancelled == report.tried >= 600
        assert report.cancelled >= 20 and report.max_in_flight == 256
    finally:
        server.stop()

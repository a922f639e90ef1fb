"""The server on its own: routes, errors, persistence across restarts, per-model job order, inference proxy."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner
from serverless_data import groups, model
from serverless_harness import Served, serve_toy
from serverless_toy_backend import ToyBackend

from art_serverless import ServerlessBackend
from art_serverless.cli import parse_backend_options
from art_serverless.plugin import art_register_commands
from art_serverless.server.host import keyword_options, train_options
from art_serverless.server.serve import read_or_create_api_key
from art_serverless.server.store import Store
from art_serverless.wire import ExperimentalConfig, parse_artifact_name


def api(
    served: Served, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
) -> httpx.Response:
    return httpx.request(
        method, f"{served.url}{path}", headers={**served.headers(), **(headers or {})}, timeout=30, **kwargs
    )


def create_model(served: Served, name: str = "agent", **extra: Any) -> dict[str, Any]:
    body = {"project": "proj", "name": name, "base_model": "toy-base", "return_existing": True, **extra}
    response = api(served, "POST", "/preview/models", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def submit(served: Served, model_id: str, rewards: list[list[float]], **metadata: Any) -> str:
    body = {
        "model_id": model_id,
        "trajectory_groups": [g.model_dump(mode="json") for g in groups(rewards, **metadata)],
    }
    response = api(served, "POST", "/preview/training-jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]  # type: ignore[no-any-return]


def wait_events(served: Served, job_id: str, deadline_s: float = 30.0) -> list[dict[str, Any]]:
    """Poll until the job's last event is terminal."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        events = api(served, "GET", f"/preview/training-jobs/{job_id}/events").json()["data"]
        if events and events[-1]["type"] in ("training_ended", "training_failed"):
            return events  # type: ignore[no-any-return]
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def test_unknown_ids_are_404(served: Served) -> None:
    assert api(served, "GET", "/preview/models/mdl_nope/checkpoints").status_code == 404
    assert api(served, "DELETE", "/preview/models/mdl_nope").status_code == 404
    response = api(served, "GET", "/preview/training-jobs/job_nope/events")
    assert response.status_code == 404 and "job_nope" in response.json()["error"]["message"]
    response = api(
        served, "POST", "/preview/training-jobs", json={"model_id": "mdl_nope", "trajectory_groups": []}
    )
    assert response.status_code == 404
    response = api(
        served,
        "POST",
        "/chat/completions",
        json={"model": "wandb-artifact:///local/proj/none", "messages": []},
    )
    assert response.status_code == 404 and "local/proj/none" in response.json()["error"]["message"]
    response = api(served, "POST", "/chat/completions", json={"model": "gpt-4", "messages": []})
    assert response.status_code == 404 and "wandb-artifact" in response.json()["error"]["message"]


def test_bad_job_bodies_are_422_and_create_no_job(served: Served) -> None:
    model_id = create_model(served)["id"]
    good = [g.model_dump(mode="json") for g in groups([[0, 1]])]
    cases = [
        {"model_id": model_id, "trajectory_groups": good, "experimental_config": {"plot_tensors": True}},
        {"model_id": model_id, "trajectory_groups": good, "experimental_config": {"learning_rate": "fast"}},
        {
            "model_id": model_id,
            "trajectory_groups": good,
            "experimental_config": {"importance_sampling_level": "x"},
        },
        {"model_id": model_id, "trajectory_groups": []},
        {"model_id": model_id, "trajectory_groups": [{"trajectories": "nope"}]},
    ]
    for body in cases:
        response = api(served, "POST", "/preview/training-jobs", json=body)
        assert response.status_code == 422, (body, response.text)
    nan_body = json.dumps({"model_id": model_id, "trajectory_groups": good}, separators=(",", ":")).replace(
        '"reward":1.0', '"reward":NaN'
    )
    assert "NaN" in nan_body
    response = api(
        served,
        "POST",
        "/preview/training-jobs",
        content=nan_body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422 and "trajectory_groups[0]" in response.json()["error"]["message"]
    assert served.backend.train_calls == []
    assert api(served, "GET", f"/preview/models/{model_id}/checkpoints").json() == {
        "data": [],
        "has_more": False,
    }
    response = api(served, "GET", "/preview/training-jobs/job_x/events", params={"after": "abc"})
    assert response.status_code == 422


def test_request_body_limit(tmp_path: Path) -> None:
    with serve_toy(tmp_path / "server", max_body_bytes=2048) as served:
        model_id = create_model(served)["id"]
        big = [g.model_dump(mode="json") for g in groups([[0, 1]] * 40)]
        response = api(
            served, "POST", "/preview/training-jobs", json={"model_id": model_id, "trajectory_groups": big}
        )
        assert response.status_code == 413 and "limit of 2048 bytes" in response.json()["error"]["message"]
        assert served.backend.train_calls == []


def test_jobs_of_one_model_run_one_at_a_time_in_order(served: Served) -> None:
    first, second = create_model(served, "a")["id"], create_model(served, "b")["id"]
    jobs = [submit(served, first, [[0, 1]], sleep_s=0.2) for _ in range(3)] + [
        submit(served, second, [[1, 0]])
    ]
    for job_id in jobs:
        events = wait_events(served, job_id)
        assert [e["type"] for e in events] == ["training_started", "gradient_step", "training_ended"]
        assert events[0]["data"] == {"num_sequences": 1}
        assert "loss/train" in events[1]["data"]
    assert served.backend.max_concurrent[first] == 1
    steps = api(served, "GET", f"/preview/models/{first}/checkpoints").json()["data"]
    assert [c["step"] for c in steps] == [1, 2, 3]
    assert steps[0]["metrics"]["loss/learning_rate"] == pytest.approx(5e-6)


def test_events_follow_the_protocol_and_page(served: Served) -> None:
    model_id = create_model(served)["id"]
    job_id = submit(served, model_id, [[0, 1]], gradient_steps=3)
    events = wait_events(served, job_id)
    assert [e["type"] for e in events] == ["training_started", *["gradient_step"] * 3, "training_ended"]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
    page = api(served, "GET", f"/preview/training-jobs/{job_id}/events", params={"limit": 2}).json()
    assert [e["id"] for e in page["data"]] == [e["id"] for e in events[:2]] and page["has_more"] is True
    rest = api(
        served, "GET", f"/preview/training-jobs/{job_id}/events", params={"after": events[1]["id"]}
    ).json()
    assert rest["data"] == events[2:] and rest["has_more"] is False
    failing = submit(served, model_id, [[0, 1]], fail="bad batch")
    failed = wait_events(served, failing)
    assert failed[-1] == {
        "id": failed[-1]["id"],
        "type": "training_failed",
        "data": {"error_message": "RuntimeError: bad batch"},
    }
    status = api(served, "GET", f"/preview/training-jobs/{failing}").json()
    assert status == {"id": failing, "model_id": model_id, "status": "failed"}


def test_checkpoint_listing_and_deletion(served: Served) -> None:
    model_id = create_model(served)["id"]
    for _ in range(4):
        wait_events(served, submit(served, model_id, [[0, 1]]))
    url = f"/preview/models/{model_id}/checkpoints"
    first = api(served, "GET", url, params={"limit": 2, "order": "desc"}).json()
    assert [c["step"] for c in first["data"]] == [4, 3] and first["has_more"]
    second = api(
        served, "GET", url, params={"limit": 2, "order": "desc", "after": first["data"][-1]["id"]}
    ).json()
    assert [c["step"] for c in second["data"]] == [2, 1] and not second["has_more"]
    response = api(served, "DELETE", url, json={"steps": [4]})
    assert response.status_code == 400 and "latest" in response.json()["error"]["message"]
    response = api(served, "DELETE", url, json={"steps": [1, 3, 9]})
    assert response.json() == {"deleted_count": 2, "not_found_steps": [9]}
    assert served.backend.deletions == [(model_id, [2, 4])]
    assert [c["step"] for c in api(served, "GET", url).json()["data"]] == [2, 4]
    assert api(served, "DELETE", url, json={"steps": [-1]}).status_code == 422
    assert api(served, "DELETE", f"/preview/models/{model_id}").json() is None
    assert api(served, "GET", url).status_code == 404


def test_restart_keeps_models_jobs_events_and_checkpoints(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    with serve_toy(data_dir) as served:
        created = create_model(served)
        job_id = submit(served, created["id"], [[0, 1]])
        events = wait_events(served, job_id)
    with serve_toy(data_dir) as again:
        assert create_model(again) == created
        assert api(again, "GET", f"/preview/training-jobs/{job_id}/events").json()["data"] == events
        checkpoints = api(again, "GET", f"/preview/models/{created['id']}/checkpoints").json()["data"]
        assert [c["step"] for c in checkpoints] == [1]
        wait_events(again, submit(again, created["id"], [[1, 0]]))
        assert [
            c["step"]
            for c in api(again, "GET", f"/preview/models/{created['id']}/checkpoints").json()["data"]
        ] == [1, 2]


def test_recovery_fails_running_jobs_and_requeues_queued_ones(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    row, created = store.create_model("e", "p", "n", "base", return_existing=False)
    assert created
    running = store.create_job(row.id, {"trajectory_groups": [], "options": {}})
    queued = store.create_job(row.id, {"trajectory_groups": [], "options": {}})
    store.start_job(running.id, 1)
    store.close()
    reopened = Store(tmp_path / "db.sqlite3")
    assert [job.id for job in reopened.recover()] == [queued.id]
    events, _ = reopened.list_events(running.id, None, 10)
    assert [e.type for e in events] == ["training_started", "training_failed"]
    assert (
        "stopped while job" in events[-1].data["error_message"]
        and "Submit" in events[-1].data["error_message"]
    )
    assert reopened.get_job(running.id).status == "failed"
    reopened.fail_job(running.id, "twice")  # a finished job never gets a second terminal event
    assert len(reopened.list_events(running.id, None, 10)[0]) == 2
    # a step the backend finished while the server went down is recorded before the next job runs
    assert reopened.note_backend_step(row.id, 1) and not reopened.note_backend_step(row.id, 1)
    assert not reopened.note_backend_step(row.id, 0)
    assert reopened.checkpoint_steps(row.id) == [1]
    reopened.close()


async def test_inference_is_proxied_with_names_mapped_both_ways(served: Served, tmp_path: Path) -> None:
    backend = ServerlessBackend(served.api_key, served.url, poll_interval=0.05, progress=False)
    trainable = model(tmp_path)
    await trainable.register(backend)
    await backend.train(trainable, groups([[0, 1]]))
    client = trainable.openai_client()
    latest = await client.chat.completions.create(
        model=trainable.get_inference_name(), messages=[{"role": "user", "content": "hi"}]
    )
    assert latest.model == "wandb-artifact:///local/proj/agent-001"
    assert latest.choices[0].message.content == f"echo {trainable.id}: hi"
    stepped = await client.chat.completions.create(
        model=trainable.get_inference_name(1), messages=[{"role": "user", "content": "yo"}]
    )
    assert stepped.model == "wandb-artifact:///local/proj/agent-001:step1"
    assert served.backend.chat_requests[-1]["model"] == f"{trainable.id}@1"
    stream = await client.chat.completions.create(
        model=trainable.get_inference_name(1), messages=[{"role": "user", "content": "s"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == f"echo {trainable.id}@1: s"
    assert {c.model for c in chunks} == {"wandb-artifact:///local/proj/agent-001:step1"}
    import openai

    with pytest.raises(
        openai.NotFoundError, match=r"wandb-artifact:///local/proj/agent-001:step7"
    ) as missing:
        await client.chat.completions.create(
            model=trainable.get_inference_name(7), messages=[{"role": "user", "content": "x"}]
        )
    assert "mdl_" not in str(missing.value), "backend-internal names never leak to the client"
    listed = [m.id async for m in client.models.list()]
    assert listed == [
        "wandb-artifact:///local/proj/agent-001",
        "wandb-artifact:///local/proj/agent-001:step1",
    ]
    await backend.close()


def test_options_map_to_the_backends_typed_train() -> None:
    accepted = keyword_options(ToyBackend().train)
    config = ExperimentalConfig(learning_rate=1e-4, ppo=True, epsilon=None, kimi_k2_tau=0.5)
    assert train_options(config, accepted, "toy") == {"learning_rate": 1e-4, "ppo": True, "kimi_k2_tau": 0.5}
    narrow = frozenset({"learning_rate", "ppo"})
    defaults = ExperimentalConfig(learning_rate=1e-4, mask_prob_ratio=False, precalculate_logprobs=False)
    assert train_options(defaults, narrow, "tinker") == {"learning_rate": 1e-4}
    with pytest.raises(
        ValueError, match=r"mask_prob_ratio=True is not supported by the server's 'tinker' backend"
    ):
        train_options(ExperimentalConfig(mask_prob_ratio=True), narrow, "tinker")

    async def untyped(model: object, groups: object, **options: object) -> None: ...

    with pytest.raises(TypeError, match="kwargs"):
        keyword_options(untyped)


def test_artifact_names_parse() -> None:
    assert parse_artifact_name("wandb-artifact:///e/p/n") == ("e", "p", "n", None)
    assert parse_artifact_name("wandb-artifact:///e/p/n:step12") == ("e", "p", "n", 12)
    assert parse_artifact_name("wandb-artifact:///e/p/n:latest") == ("e", "p", "n", None)
    for bad in ("e/p/n", "wandb-artifact:///e/p", "wandb-artifact:///e/p/n/x", "wandb-artifact:///e//n"):
        with pytest.raises(ValueError):
            parse_artifact_name(bad)


def test_cli_command_is_contributed_and_key_files_are_private(tmp_path: Path) -> None:
    group = click.Group("art")
    art_register_commands(cli=group)
    result = CliRunner().invoke(group, ["serverless", "serve", "--help"])
    assert result.exit_code == 0
    for option in ("--backend", "--host", "--port", "--api-key-file", "--data-dir"):
        assert option in result.output
    key_file = tmp_path / "keys" / "api_key"
    key = read_or_create_api_key(key_file)
    assert key.startswith("art-") and len(key) > 30 and key_file.stat().st_mode & 0o777 == 0o600
    assert read_or_create_api_key(key_file) == key
    key_file.write_text("short")
    with pytest.raises(ValueError, match="at least 8"):
        read_or_create_api_key(key_file)
    assert parse_backend_options(("device=cpu", "lora_rank=8", "flag=true")) == {
        "device": "cpu",
        "lora_rank": 8,
        "flag": True,
    }
    with pytest.raises(click.BadParameter):
        parse_backend_options(("nonsense",))


async def test_many_concurrent_polls_while_training(served: Served) -> None:
    """Training runs on the backend's own loop: event polls keep answering while a job sleeps in train()."""
    model_id = create_model(served)["id"]
    job_id = submit(served, model_id, [[0, 1]], sleep_s=3.0)
    seen_running = False
    async with httpx.AsyncClient(base_url=served.url, headers=served.headers()) as client:
        for _ in range(100):  # until a burst lands while the job is inside train() (a loaded CI box is slow)
            answers = await asyncio.gather(
                *(client.get(f"/preview/training-jobs/{job_id}/events") for _ in range(20))
            )
            assert all(a.status_code == 200 for a in answers)
            latest = [a.json()["data"][-1]["type"] for a in answers if a.json()["data"]]
            if "training_started" in latest:
                seen_running = True
                break
            if "training_ended" in latest:
                break
            await asyncio.sleep(0.05)
    assert seen_running, "no burst of 20 concurrent polls was answered while the job was training"
    wait_events(served, job_id)

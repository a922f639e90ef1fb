"""Crash faults with the server as a real subprocess: kill -9 mid-job, then restart on the same data directory."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from serverless_data import groups, model
from serverless_harness import ProcessServer, toy_server_argv

from art_serverless import RetryPolicy, ServerlessAPIError, ServerlessBackend, TrainingStalledError

KEY = "fault-test-key-0123"
NO_PROGRESS_S = 4.0


async def wait_for_file(path: Path, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        await asyncio.sleep(0.05)


def events(url: str, job_id: str) -> list[dict[str, object]]:
    response = httpx.get(
        f"{url}/preview/training-jobs/{job_id}/events", headers={"Authorization": f"Bearer {KEY}"}
    )
    response.raise_for_status()
    return response.json()["data"]  # type: ignore[no-any-return]


async def test_killed_server_stalls_the_client_and_a_restart_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    data_dir, key_file = tmp_path / "server", tmp_path / "api_key"
    key_file.write_text(KEY)
    argv = toy_server_argv(data_dir, key_file)
    env = {"ART_LOAD_PLUGINS": ""}  # only the toy fixture backend: no torch in this subprocess
    first = ProcessServer(argv, env=env).start()
    try:
        backend = ServerlessBackend(
            KEY,
            first.url,
            poll_interval=0.1,
            no_progress_timeout=NO_PROGRESS_S,
            progress=False,
            retry=RetryPolicy(max_retries=2, initial_delay=0.05),
        )
        trainable = model(tmp_path)
        await trainable.register(backend)
        marker = tmp_path / "train-started"
        batch = groups([[0, 1]], sleep_s=120, started_marker=str(marker))
        training = asyncio.create_task(backend.train(trainable, batch))
        await wait_for_file(marker)
        queued = httpx.post(
            f"{first.url}/preview/training-jobs",
            headers={"Authorization": f"Bearer {KEY}"},
            json={
                "model_id": trainable.id,
                "trajectory_groups": [g.model_dump(mode="json") for g in groups([[1, 0]])],
            },
        ).json()["id"]
        first.kill()
        with pytest.raises(TrainingStalledError) as caught:
            await asyncio.wait_for(training, NO_PROGRESS_S + 30)
    finally:
        first.kill()
    stalled = caught.value
    assert stalled.job_id in str(stalled) and f"{NO_PROGRESS_S:g} s" in str(stalled)
    assert isinstance(stalled.__cause__, ServerlessAPIError) and stalled.__cause__.status_code is None, (
        "the client gave up because the server was unreachable"
    )

    second = ProcessServer(argv, env=env).start()
    try:
        interrupted = events(second.url, stalled.job_id)
        assert [e["type"] for e in interrupted] == ["training_started", "training_failed"]
        assert "stopped while job" in str(interrupted[-1]["data"])
        end = time.monotonic() + 30
        while (
            events(second.url, queued)[-1:] == []
            or events(second.url, queued)[-1]["type"] != "training_ended"
        ):
            assert time.monotonic() < end, "the queued job was not run after the restart"
            await asyncio.sleep(0.05)
        again = ServerlessBackend(KEY, second.url, poll_interval=0.05, progress=False)
        same = model(tmp_path)
        await same.register(again)
        assert same.id == trainable.id
        assert await same.get_step() == 1, "only the re-queued job produced a checkpoint"
        result = await again.train(same, groups([[0, 1]]))
        assert result.step == 2
        await again.close()
        await backend.close()
    finally:
        second.stop()
        second.kill()

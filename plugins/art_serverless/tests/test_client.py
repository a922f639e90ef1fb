"""ServerlessBackend against the real server app on a real loopback uvicorn (toy backend behind it)."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import httpx
import pytest
from serverless_data import groups, model
from serverless_harness import Served

from art_core.backend import COMMON_TRAIN_DEFAULTS, TrainableBackend
from art_core.results import ServerlessTrainResult
from art_serverless import RetryPolicy, ServerlessAPIError, ServerlessBackend, TrainingJobFailedError
from art_serverless.wire import EXPERIMENTAL_CONFIG_KEYS


def client(served: Served, **kwargs: object) -> ServerlessBackend:
    options: dict[str, object] = {"poll_interval": 0.05, "progress": False, **kwargs}
    return ServerlessBackend(served.api_key, served.url, **options)  # type: ignore[arg-type]


def test_api_key_comes_from_the_argument_or_wandb_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"api_key=.*WANDB_API_KEY"):
        ServerlessBackend()
    monkeypatch.setenv("WANDB_API_KEY", "from-env-123")
    backend = ServerlessBackend()
    assert backend.api_key == "from-env-123"
    assert backend.base_url == "https://api.training.wandb.ai/v1"
    assert ServerlessBackend("explicit-key", "http://127.0.0.1:9/v1/").api_key == "explicit-key"
    with pytest.raises(ValueError, match="base_url"):
        ServerlessBackend("k", "ftp://example")


async def test_train_is_typed_and_satisfies_the_protocol(served: Served, tmp_path: Path) -> None:
    backend = client(served)
    assert isinstance(backend, TrainableBackend)
    checked: TrainableBackend = backend  # mypy checks the structural match
    parameters = inspect.signature(ServerlessBackend.train).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    assert {k: parameters[k].default for k in COMMON_TRAIN_DEFAULTS} == COMMON_TRAIN_DEFAULTS
    assert set(EXPERIMENTAL_CONFIG_KEYS) | {"verbose"} == {
        name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    trainable = model(tmp_path)
    await trainable.register(checked)
    before = len(served.log.entries)
    with pytest.raises(TypeError, match="plot_tensors"):
        await backend.train(trainable, groups([[0, 1]]), plot_tensors=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="advantage_balance=2"):
        await backend.train(trainable, groups([[0, 1]]), advantage_balance=2.0)
    with pytest.raises(ValueError, match="empty"):
        await backend.train(trainable, [])
    assert len(served.log.entries) == before, "bad options must not reach the server"
    await backend.close()


async def test_register_is_idempotent_and_takes_the_servers_entity(served: Served, tmp_path: Path) -> None:
    backend = client(served)
    first, second = model(tmp_path), model(tmp_path)
    await first.register(backend)
    await second.register(backend)
    assert first.id is not None and first.id == second.id
    assert first.entity == "local"
    assert backend._model_inference_name(first) == "wandb-artifact:///local/proj/agent-001"
    assert first.get_inference_name(3) == "wandb-artifact:///local/proj/agent-001:step3"
    listing = httpx.get(f"{served.url}/models", headers=served.headers()).json()
    assert [m["id"] for m in listing["data"]] == ["wandb-artifact:///local/proj/agent-001"]
    other = model(tmp_path, entity="team")
    await other.register(backend)
    assert other.entity == "team" and other.id != first.id
    clash = model(tmp_path)
    clash.base_model = "another-base"
    with pytest.raises(ServerlessAPIError, match="base_model") as caught:
        await clash.register(backend)
    assert caught.value.status_code == 409
    await backend.close()


async def test_train_steps_log_and_delete_checkpoints(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = client(served)
    trainable = model(tmp_path)
    await trainable.register(backend)
    assert await trainable.get_step() == 0
    results = []
    for index, first_group in enumerate(([0.0, 1.0], [1.0, 0.5], [0.0, 0.5])):  # step 2 has the best reward
        batch = groups([first_group, [1.0, 1.0]])
        result = await backend.train(trainable, batch, learning_rate=1e-3, ppo=index == 1, verbose=index == 0)
        await trainable.log(batch, metrics=result.metrics, step=result.step)
        results.append(result)
    assert [r.step for r in results] == [1, 2, 3]
    assert all(isinstance(r, ServerlessTrainResult) for r in results)
    assert results[2].artifact_name == "local/proj/agent-001:step3"
    metrics = results[0].metrics
    assert metrics["loss/learning_rate"] == pytest.approx(1e-3)
    assert metrics["data/step_num_groups_submitted"] == 2
    assert metrics["data/step_num_groups_trainable"] == 1
    assert metrics["data/step_num_trajectories"] == 4
    assert metrics["data/step_num_gradient_steps"] == 1
    assert [call["ppo"] for call in served.backend.train_calls] == [False, True, False]
    assert served.backend.train_calls[0]["learning_rate"] == pytest.approx(1e-3)
    assert "[serverless] training job job_" in capsys.readouterr().err
    assert await trainable.get_step() == 3
    checkpoints = await backend.list_checkpoints(trainable)
    assert [c.step for c in checkpoints] == [1, 2, 3]
    kept = await trainable.delete_checkpoints("train/reward")
    assert kept == [2, 3]
    assert [c.step for c in await backend.list_checkpoints(trainable)] == kept
    assert served.backend.deletions[-1][1] == kept
    await backend.close()


async def test_wire_fidelity(served: Served, tmp_path: Path) -> None:
    backend = client(served)
    trainable = model(tmp_path)
    await trainable.register(backend)
    batch = groups([[0.0, 1.0]])
    await backend.train(
        trainable,
        batch,
        learning_rate=2e-5,
        epsilon=0.3,
        importance_sampling_level="sequence",
        kimi_k2_tau=0.1,
    )
    await backend.train(trainable, groups([[1.0, 0.0]]))
    await backend._delete_checkpoint_files(trainable, [2])
    mid = trainable.id
    entries = [(e.method, e.path, e.query, e.body) for e in served.log.entries]
    assert entries[0] == (
        "POST",
        "/v1/preview/models",
        {},
        {
            "entity": None,
            "project": "proj",
            "name": "agent-001",
            "base_model": "toy-base",
            "return_existing": True,
        },
    )
    job_posts = [e for e in entries if e[:2] == ("POST", "/v1/preview/training-jobs")]
    assert len(job_posts) == 2
    assert job_posts[0][3] == {
        "model_id": mid,
        "trajectory_groups": [group.model_dump(mode="json") for group in batch],
        "experimental_config": {
            "learning_rate": 2e-5,
            "ppo": False,
            "epsilon": 0.3,
            "epsilon_high": None,
            "advantage_balance": 0.0,
            "scale_rewards": True,
            "importance_sampling_level": "sequence",
            "max_negative_advantage_importance_sampling_weight": None,
            "mask_prob_ratio": False,
            "kimi_k2_tau": 0.1,
            "precalculate_logprobs": False,
        },
    }
    # the Choice (the trained tokens) survives the wire as a Choice, logprobs included
    sent_choice = job_posts[0][3]["trajectory_groups"][0]["trajectories"][0]["messages_and_choices"][1]
    assert sent_choice["logprobs"]["content"][0]["token"] == "token_id:3"
    polls = [e for e in entries if e[0] == "GET" and e[1].endswith("/events")]
    assert polls and all(e[3] is None for e in polls)
    assert polls[0][2] == {}, "the first poll has no 'after'"
    after_ids = [int(e[2]["after"]) for e in polls if "after" in e[2]]
    assert after_ids == sorted(after_ids)
    checkpoint_calls = [e for e in entries if e[1] == f"/v1/preview/models/{mid}/checkpoints"]
    assert (
        "GET",
        f"/v1/preview/models/{mid}/checkpoints",
        {"limit": "1", "order": "desc"},
        None,
    ) in checkpoint_calls
    assert ("GET", f"/v1/preview/models/{mid}/checkpoints", {"order": "asc"}, None) in checkpoint_calls
    assert checkpoint_calls[-1] == ("DELETE", f"/v1/preview/models/{mid}/checkpoints", {}, {"steps": [1]})
    await backend.delete(trainable)
    last = served.log.entries[-1]
    assert (last.method, last.path, last.query, last.body, last.status) == (
        "DELETE",
        f"/v1/preview/models/{mid}",
        {},
        None,
        200,
    )
    assert trainable.id is None
    await backend.close()


async def test_wrong_or_missing_key_is_401_and_changes_nothing(served: Served, tmp_path: Path) -> None:
    intruder = ServerlessBackend("wrong-key-123456", served.url, progress=False)
    with pytest.raises(ServerlessAPIError, match="API key") as caught:
        await model(tmp_path).register(intruder)
    assert caught.value.status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {served.api_key}"}):
        response = httpx.post(f"{served.url}/preview/models", content=b"{broken", headers=headers)
        assert response.status_code == 401, "auth is checked before the body is even parsed"
        assert "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{served.url}/models", headers=served.headers()).json()["data"] == []
    await intruder.close()


def test_malformed_json_is_422_with_a_json_error(served: Served) -> None:
    headers = {**served.headers(), "Content-Type": "application/json"}
    for body in (
        b"{not json",
        b'{"project": "p"}',
        b'{"project": "p", "name": "n", "base_model": "b", "extra": 1}',
    ):
        response = httpx.post(f"{served.url}/preview/models", content=body, headers=headers)
        assert response.status_code == 422
        assert response.json()["error"]["message"].startswith("invalid request")
    response = httpx.post(
        f"{served.url}/preview/models",
        json={"project": "a/b", "name": "n", "base_model": "b"},
        headers=served.headers(),
    )
    assert response.status_code == 422 and "path separator" in response.json()["error"]["message"]
    assert httpx.get(f"{served.url}/models", headers=served.headers()).json()["data"] == []


async def test_get_is_retried_on_503_then_succeeds(served: Served, tmp_path: Path) -> None:
    backend = client(served)
    trainable = model(tmp_path)
    await trainable.register(backend)
    path = f"/v1/preview/models/{trainable.id}/checkpoints"
    served.log.fail("GET", path, times=2, retry_after="0")
    assert await trainable.get_step() == 0
    assert [e.status for e in served.log.calls("GET", path)] == [503, 503, 200]
    served.log.fail("GET", path, times=5, status=500, retry_after="0")
    stubborn = client(served, retry=RetryPolicy(max_retries=2, initial_delay=0.0))
    with pytest.raises(ServerlessAPIError) as caught:
        await stubborn._get_step(trainable)
    assert caught.value.status_code == 500
    assert [e.status for e in served.log.calls("GET", path)][-3:] == [500, 500, 500]
    await backend.close()
    await stubborn.close()


async def test_post_is_never_retried(served: Served, tmp_path: Path) -> None:
    backend = client(served, retry=RetryPolicy(initial_delay=0.0))
    trainable = model(tmp_path)
    await trainable.register(backend)
    served.log.fail("POST", "/v1/preview/training-jobs", times=1, retry_after="0")
    with pytest.raises(ServerlessAPIError) as caught:
        await backend.train(trainable, groups([[0, 1]]))
    assert caught.value.status_code == 503
    assert [e.status for e in served.log.calls("POST", "/v1/preview/training-jobs")] == [503]
    assert served.backend.train_calls == []
    served.log.fail(
        "DELETE", f"/v1/preview/models/{trainable.id}/checkpoints", times=1, status=409, retry_after="0"
    )
    await backend.train(trainable, groups([[0, 1]]))
    await backend.train(trainable, groups([[0, 1]]))
    await backend._delete_checkpoint_files(trainable, [2])
    deletes = served.log.calls("DELETE", f"/v1/preview/models/{trainable.id}/checkpoints")
    assert [e.status for e in deletes] == [409, 200], "DELETE is retried on 409"
    await backend.close()


async def test_a_failing_job_raises_with_the_servers_message_quickly(served: Served, tmp_path: Path) -> None:
    backend = ServerlessBackend(served.api_key, served.url, progress=False)  # default 1 s polling
    trainable = model(tmp_path)
    await trainable.register(backend)
    with pytest.raises(TrainingJobFailedError, match="the reward server is on fire") as caught:
        await asyncio.wait_for(
            backend.train(trainable, groups([[0, 1]], fail="the reward server is on fire")), 5.0
        )
    assert caught.value.job_id.startswith("job_")
    assert "RuntimeError" in caught.value.message
    assert await trainable.get_step() == 0, "a failed job records no checkpoint"
    await backend.close()


async def test_a_call_without_an_optimizer_step_still_reports_the_servers_metrics(
    served: Served, tmp_path: Path
) -> None:
    backend = client(served)
    trainable = model(tmp_path)
    await trainable.register(backend)
    result = await backend.train(trainable, groups([[1.0, 1.0]], gradient_steps=0), learning_rate=3e-4)
    assert result.metrics["data/step_num_gradient_steps"] == 0
    assert result.metrics["loss/learning_rate"] == pytest.approx(3e-4), "carried by training_ended"
    assert result.metrics["data/step_num_groups_trainable"] == 0
    await backend.close()


def test_the_client_is_light() -> None:
    """Importing the client (and the plugin's hooks) loads no server, torch or wandb."""
    import subprocess
    import sys

    code = (
        "import sys, art_serverless, art_serverless.plugin, art_serverless.cli; "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch', 'transformers', 'wandb') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"

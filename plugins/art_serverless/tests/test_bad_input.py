"""Bad input from an outsider, over real HTTP: every value is a 4xx naming the field, and nothing is stored."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serverless_data import groups
from serverless_harness import Served, serve_toy

from art_serverless.server.app import DATABASE_NAME

GOOD_GROUPS = [g.model_dump(mode="json") for g in groups([[1.0, 0.0]])]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_toy(tmp_path_factory.mktemp("bad-input") / "server") as handle:
        yield handle


@pytest.fixture(scope="module")
def model_id(server: Served) -> str:
    body = {"project": "proj", "name": "probe", "base_model": "toy-base", "return_existing": True}
    response = httpx.post(f"{server.url}/preview/models", json=body, headers=server.headers())
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def _post_raw(server: Served, path: str, body: Any) -> httpx.Response:
    # json.dumps writes NaN and Infinity, as a careless client's JSON encoder would
    return httpx.post(
        f"{server.url}{path}",
        content=json.dumps(body).encode(),
        headers={**server.headers(), "content-type": "application/json"},
        timeout=30,
    )


def _trajectory(**fields: Any) -> dict[str, Any]:
    return {"messages_and_choices": [{"role": "user", "content": "q"}], "reward": 1.0, **fields}


def _group(**fields: Any) -> dict[str, Any]:
    return {**GOOD_GROUPS[0], **fields}


# (groups, options, words the error must contain)
JOB_CASES: dict[str, tuple[Any, dict[str, Any] | None, tuple[str, ...]]] = {
    "trajectories is a number": ([{"trajectories": 5}], None, ("trajectory_groups[0].trajectories", "list")),
    "exceptions is a number": ([_group(exceptions=5)], None, ("trajectory_groups[0].exceptions", "list")),
    "logs is a number": ([_group(logs=5)], None, ("trajectory_groups[0].logs", "list")),
    "messages is a number": (
        [{"trajectories": [_trajectory(messages_and_choices=5)]}],
        None,
        ("trajectories[0].messages_and_choices", "list"),
    ),
    "histories is a number": (
        [{"trajectories": [_trajectory(additional_histories=5)]}],
        None,
        ("trajectories[0].additional_histories", "list"),
    ),
    "group is a string": (["group"], None, ("trajectory_groups.0", "dictionary")),
    "groups is a dict": ({"a": 1}, None, ("trajectory_groups", "list")),
    "no groups": ([], None, ("trajectory_groups is empty",)),
    "empty group": ([{}], None, ("group 0", "no trajectories")),
    "reward is a string": ([{"trajectories": [_trajectory(reward="high")]}], None, ("reward",)),
    "reward is NaN": ([{"trajectories": [_trajectory(reward=NAN)]}], None, ("trajectories[0].reward", "nan")),
    "reward is 1e400": ([{"trajectories": [_trajectory(reward=INF)]}], None, ("reward", "inf", "finite")),
    "trajectory metric is NaN": (
        [{"trajectories": [_trajectory(metrics={"acc": NAN})]}],
        None,
        ("trajectories[0].metrics.acc", "nan"),
    ),
    "group metric is inf": (
        [_group(metrics={"acc": INF})],
        None,
        ("trajectory_groups[0].metrics.acc", "inf"),
    ),
    "metadata is a list": ([_group(metadata=[1])], None, ("metadata", "dictionary")),
    "policy version negative": (
        [{"trajectories": [_trajectory(initial_policy_version=-5)]}],
        None,
        ("initial_policy_version=-5", "[0, "),
    ),
    "policy version huge": (
        [{"trajectories": [_trajectory(final_policy_version=10**30)]}],
        None,
        ("final_policy_version=1000000000000000000000000000000",),
    ),
    "learning_rate NaN": (GOOD_GROUPS, {"learning_rate": NAN}, ("learning_rate", "finite")),
    "learning_rate inf": (GOOD_GROUPS, {"learning_rate": INF}, ("learning_rate", "finite")),
    "learning_rate zero": (GOOD_GROUPS, {"learning_rate": 0}, ("learning_rate", "greater than 0")),
    "learning_rate negative": (GOOD_GROUPS, {"learning_rate": -1e-5}, ("learning_rate", "greater than 0")),
    "learning_rate a string": (GOOD_GROUPS, {"learning_rate": "1e-5"}, ("learning_rate", "number")),
    "learning_rate 10^400": (GOOD_GROUPS, {"learning_rate": 10**400}, ("learning_rate",)),
    "epsilon negative": (GOOD_GROUPS, {"epsilon": -0.2}, ("epsilon", "greater than or equal to 0")),
    "epsilon_high NaN": (GOOD_GROUPS, {"epsilon_high": NAN}, ("epsilon_high", "finite")),
    "advantage_balance 5": (GOOD_GROUPS, {"advantage_balance": 5}, ("advantage_balance", "less than")),
    "advantage_balance NaN": (GOOD_GROUPS, {"advantage_balance": NAN}, ("advantage_balance", "finite")),
    "kimi_k2_tau inf": (GOOD_GROUPS, {"kimi_k2_tau": INF}, ("kimi_k2_tau", "finite")),
    "max negative IS weight negative": (
        GOOD_GROUPS,
        {"max_negative_advantage_importance_sampling_weight": -1},
        ("max_negative_advantage_importance_sampling_weight",),
    ),
    "importance_sampling_level unknown": (
        GOOD_GROUPS,
        {"importance_sampling_level": "tokens"},
        ("importance_sampling_level", "'token'"),
    ),
    "ppo a string": (GOOD_GROUPS, {"ppo": "yes"}, ("ppo", "boolean")),
    "option typo": (GOOD_GROUPS, {"learning_rat": 1e-5}, ("learning_rat", "not permitted")),
}


def _job_count(server: Served) -> int:
    with sqlite3.connect(f"file:{server.data_dir / DATABASE_NAME}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_bad_training_job_is_a_422_naming_the_value(server: Served, model_id: str, case: str) -> None:
    raw_groups, options, words = JOB_CASES[case]
    body: dict[str, Any] = {"model_id": model_id, "trajectory_groups": raw_groups}
    if options is not None:
        body["experimental_config"] = options
    jobs_before = _job_count(server)
    response = _post_raw(server, "/preview/training-jobs", body)
    assert response.status_code == 422, (case, response.status_code, response.text)
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, (case, word, message)
    assert _job_count(server) == jobs_before, "a refused job was stored"


def test_a_good_job_after_the_bad_ones_is_queued(server: Served, model_id: str) -> None:
    jobs_before = _job_count(server)
    response = _post_raw(
        server,
        "/preview/training-jobs",
        {
            "model_id": model_id,
            "trajectory_groups": GOOD_GROUPS,
            "experimental_config": {"learning_rate": 1e-5},
        },
    )
    assert response.status_code == 200, response.text
    assert _job_count(server) == jobs_before + 1


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"project": "proj", "name": "agent@3", "base_model": "b"}, ("'agent@3'", "'@'", "'agent-3'")),
        ({"project": "proj", "name": "agent:step3", "base_model": "b"}, ("':'", "name:stepN")),
        ({"project": "proj", "name": "a", "base_model": "x" * 100_000}, ("base_model", "at most 4096")),
        ({"project": "proj", "name": "a", "base_model": "bad\nname"}, ("base_model", "control")),
        ({"project": "proj", "name": 5, "base_model": "b"}, ("body.name", "string")),
        ({"project": "proj", "name": "a", "base_model": "b", "return_existing": "yes"}, ("return_existing",)),
    ],
)
def test_bad_model_is_a_422_naming_the_value(
    server: Served, body: dict[str, Any], words: tuple[str, ...]
) -> None:
    response = _post_raw(server, "/preview/models", body)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert all(word in message for word in words), message
    listed = httpx.get(f"{server.url}/models", headers=server.headers()).json()["data"]
    assert not any("agent" in entry["id"] for entry in listed), "a refused model was created"


def test_numbers_too_long_to_parse_are_4xx(server: Served, model_id: str) -> None:
    huge = "9" * 5000
    events = httpx.get(
        f"{server.url}/preview/training-jobs/job_x/events", params={"after": huge}, headers=server.headers()
    )
    assert events.status_code == 422 and "after=" in events.json()["error"]["message"], events.text
    chat = _post_raw(
        server,
        "/chat/completions",
        {"model": f"wandb-artifact:///local/proj/probe:step{huge}", "messages": []},
    )
    assert chat.status_code == 404, chat.text
    assert "5000 digits" in chat.json()["error"]["message"]
    typed = _post_raw(server, "/chat/completions", {"model": 5, "messages": []})
    assert typed.status_code == 422 and "a int, not a string" in typed.json()["error"]["message"]


def test_a_content_length_of_thousands_of_digits_is_413(server: Served) -> None:
    import socket

    host, port = server.url.removeprefix("http://").split("/")[0].split(":")
    request = (
        f"POST /v1/preview/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {'9' * 5000}\r\n\r\n{{}}"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request.encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert b" 500 " not in status_line and status_line.split()[1][:1] == b"4", status_line

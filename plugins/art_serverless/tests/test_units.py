"""Pure pieces: retry timing, metric names, tolerant parsing of the hosted service's records."""

from __future__ import annotations

import email.utils

import httpx
import pytest

from art_serverless.metrics import canonical_metric_name, mean_metrics, step_metrics
from art_serverless.transport import RetryPolicy, is_retryable_status, retry_after_seconds, retry_delay
from art_serverless.wire import CheckpointRecord, EventRecord, artifact_name


def test_retry_after_is_honoured_in_seconds_dates_and_milliseconds() -> None:
    assert retry_after_seconds(httpx.Headers({"retry-after": "2.5"})) == 2.5
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_seconds(httpx.Headers({"retry-after": date}), now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx.Headers({})) is None
    policy = RetryPolicy(initial_delay=0.5, max_delay=8.0, max_retry_after=60.0)
    asked = httpx.Response(503, headers={"retry-after": "7"})
    assert retry_delay(0, policy, asked) == 7.0
    assert retry_delay(0, policy, httpx.Response(503, headers={"retry-after": "3600"})) == 60.0
    for attempt, nominal in ((0, 0.5), (1, 1.0), (2, 2.0), (6, 8.0)):
        assert 0.75 * nominal <= retry_delay(attempt, policy, None) <= nominal
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_which_statuses_are_retried() -> None:
    assert [s for s in (400, 401, 404, 408, 409, 413, 422, 429, 500, 502, 503) if is_retryable_status(s)] == [
        408,
        409,
        429,
        500,
        502,
        503,
    ]


def test_metric_names_and_means() -> None:
    assert canonical_metric_name("policy_loss") == "loss/train"
    assert canonical_metric_name("grad_norm") == "loss/grad_norm"
    assert canonical_metric_name("loss/entropy") == "loss/entropy"
    assert canonical_metric_name("tokens_per_second") is None
    assert step_metrics({"loss": 1, "flag": True, "text": "x", "bad": float("nan")}) == {"loss/train": 1.0}
    assert mean_metrics([{"a": 1.0}, {"a": 3.0, "b": 2.0}]) == {"a": 2.0, "b": 2.0}


def test_records_tolerate_nulls_and_extra_fields() -> None:
    event = EventRecord.model_validate({"id": "9", "type": "training_ended", "data": None, "created_at": 1})
    assert event.data == {}
    assert CheckpointRecord.model_validate({"id": "c", "step": 2, "metrics": None}).metrics == {}
    assert artifact_name("e", "p", "n", 0) == "wandb-artifact:///e/p/n:step0"

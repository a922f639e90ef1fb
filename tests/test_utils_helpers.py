"""iterate_dataset (ART's batches, resumable), retry (backoff, counted in metrics) and limit_concurrency."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

import art_core as art
from art_core.utils import DatasetBatch, iterate_dataset, limit_concurrency, retry


def art_reference_batches(items: list[int], per_step: int, epochs: int) -> list[list[int]]:
    """OpenPipe ART's shuffle, re-derived: ``random.seed(epoch); random.shuffle(indices)``."""
    batches = []
    state = random.getstate()
    try:
        for epoch in range(epochs):
            indices = list(range(len(items)))
            random.seed(epoch)
            random.shuffle(indices)
            batches += [[items[i] for i in indices[s : s + per_step]] for s in range(0, len(items), per_step)]
    finally:
        random.setstate(state)
    return batches


def test_batches_match_art_and_cover_every_item_each_epoch() -> None:
    items = list(range(10))
    batches = list(iterate_dataset(items, groups_per_step=4, num_epochs=3, use_tqdm=False))
    assert [b.items for b in batches] == art_reference_batches(items, 4, 3)
    assert [(b.step, b.epoch, b.epoch_step) for b in batches[:4]] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 0, 2),
        (3, 1, 0),
    ]
    assert {b.total_steps for b in batches} == {9} and [len(b.items) for b in batches[:3]] == [4, 4, 2]
    for epoch in range(3):
        assert sorted(i for b in batches if b.epoch == epoch for i in b.items) == items
    assert batches[0].items != batches[3].items  # each epoch is shuffled anew


def test_resuming_at_a_step_gives_the_same_batches() -> None:
    items = [f"scenario-{i}" for i in range(7)]
    full = list(iterate_dataset(items, 2, num_epochs=2, use_tqdm=False))
    resumed = list(iterate_dataset(items, 2, num_epochs=2, initial_step=5, use_tqdm=False))
    assert resumed == full[5:] and resumed[0].step == 5
    assert list(iterate_dataset(items, 2, num_epochs=2, initial_step=99, use_tqdm=False)) == []


def test_a_seed_changes_the_order_deterministically_and_leaves_global_random_alone() -> None:
    random.seed(123)
    before = random.random()
    random.seed(123)
    seeded = [b.items for b in iterate_dataset(list(range(20)), 20, 2, use_tqdm=False, seed=7)]
    assert random.random() == before  # the global generator was not reseeded
    assert seeded == [b.items for b in iterate_dataset(list(range(20)), 20, 2, use_tqdm=False, seed=7)]
    assert seeded != [b.items for b in iterate_dataset(list(range(20)), 20, 2, use_tqdm=False)]


def test_progress_bar_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(list(iterate_dataset([1, 2, 3], 1, initial_step=1))) == 2
    assert "Iterating dataset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="groups_per_step=0 must be at least 1"):
        list(iterate_dataset([1], 0))
    with pytest.raises(TypeError, match="num_epochs must be an int"):
        list(iterate_dataset([1], 1, 1.5))  # type: ignore[arg-type]
    assert isinstance(next(iterate_dataset([1], use_tqdm=False)), DatasetBatch)


async def test_retry_retries_only_the_listed_exceptions_with_backoff() -> None:
    calls: list[float] = []
    seen: list[tuple[str, int]] = []

    @retry(
        max_attempts=3,
        delay=0.05,
        backoff_factor=2.0,
        exceptions=(ConnectionError,),
        on_retry=lambda e, n: seen.append((str(e), n)),
    )
    async def flaky_rollout(succeed_on: int) -> art.Trajectory:
        calls.append(time.monotonic())
        if len(calls) < succeed_on:
            raise ConnectionError(f"tool down {len(calls)}")
        return art.Trajectory(reward=1.0)

    trajectory = await flaky_rollout(3)
    assert trajectory.metrics["retries"] == 2 and seen == [("tool down 1", 1), ("tool down 2", 2)]
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # exponential backoff
    calls.clear()
    with pytest.raises(ConnectionError, match="tool down 3"):
        await flaky_rollout(9)  # the last failure propagates unchanged
    assert len(calls) == 3

    @retry(exceptions=ConnectionError)
    async def wrong() -> None:
        calls.append(0.0)
        raise KeyError("not retried")

    calls.clear()
    with pytest.raises(KeyError):
        await wrong()
    assert len(calls) == 1


def test_retry_works_on_sync_functions_and_checks_its_arguments() -> None:
    attempts = []

    @retry(max_attempts=2, delay=0.0)
    def parse(text: str) -> int:
        attempts.append(text)
        if len(attempts) == 1:
            raise ValueError("first")
        return int(text)

    assert parse("4") == 4 and attempts == ["4", "4"]
    with pytest.raises(ValueError, match="max_attempts=0"):
        retry(max_attempts=0)
    with pytest.raises(TypeError, match="exception class"):
        retry(exceptions=("ValueError",))  # type: ignore[arg-type]


async def test_limit_concurrency_caps_calls_across_rollouts_and_per_key() -> None:
    running: dict[str, int] = {}
    peak: dict[str, int] = {}

    @limit_concurrency(2, derive_key=lambda host, i: host)
    async def call_tool(host: str, i: int) -> int:
        running[host] = running.get(host, 0) + 1
        peak[host] = max(peak.get(host, 0), running[host])
        await asyncio.sleep(0.01)
        running[host] -= 1
        return i

    results = await asyncio.gather(*(call_tool(h, i) for i in range(10) for h in ("a", "b")))
    assert sorted(results) == sorted(list(range(10)) * 2)
    assert peak == {"a": 2, "b": 2}


def test_limit_concurrency_survives_new_event_loops_and_times_out_clearly() -> None:
    @limit_concurrency(1, timeout=0.05)
    async def slow() -> None:
        await asyncio.sleep(0.3)

    async def two_at_once() -> None:
        await asyncio.gather(slow(), slow())

    for _ in range(2):  # a second asyncio.run gets its own slots
        with pytest.raises(TimeoutError, match=r"waited 0.05 s for one of its 1 concurrency slots"):
            asyncio.run(two_at_once())
    with pytest.raises(ValueError, match="n=0"):
        limit_concurrency(0)


def test_limit_concurrency_refuses_a_sync_function_when_decorating() -> None:
    def double(x: int) -> int:
        return 2 * x

    with pytest.raises(TypeError, match="double is not one: make it `async def`"):
        limit_concurrency(2)(double)  # type: ignore[arg-type]

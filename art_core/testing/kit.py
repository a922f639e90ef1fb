"""What each conformance test works with: an event loop with a timeout, the backend and helpers around it."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import pytest

import art_core as art
from art_core.testing.probes import Sample, sample_many

if TYPE_CHECKING:
    from art_core.testing.suite import SuiteBase

T = TypeVar("T")


def violation(defect: str, rule: str) -> NoReturn:
    """Fail the running test with what the backend did and the rule of the contract it broke."""
    pytest.fail(f"{defect}\n  rule: {rule}", pytrace=False)


class LoopRunner:
    """An event loop on its own thread; ``run`` waits for a coroutine with a timeout."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="conformance-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            violation(
                f"a backend call did not finish within {timeout} s (a hang)",
                "every call returns or raises within call_timeout_s",
            )

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class Kit:
    """The backend under test, a runner, and helpers to make models, groups and samples."""

    def __init__(self, suite: SuiteBase, backend: Any, base_model: str, base_path: Path) -> None:
        self.suite = suite
        self.backend = backend
        self.base_model = base_model
        self.base_path = base_path
        self.runner = LoopRunner()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.runner.run(coroutine, timeout or self.suite.call_timeout_s)

    def new_model(self, name: str | None = None) -> art.TrainableModel:
        return art.TrainableModel(
            name=name or f"conformance-{uuid.uuid4().hex[:8]}",
            project="conformance",
            base_model=self.base_model,
            base_path=str(self.base_path),
            report_metrics=[],
        )

    def registered_model(self) -> art.TrainableModel:
        model = self.new_model()
        self.run(model.register(self.backend))
        return model

    def groups(self, model: art.TrainableModel, *, equal_rewards: bool = False) -> list[art.TrajectoryGroup]:
        """Groups sampled through the backend's own endpoint (or the suite's ``make_groups``)."""
        return self.run(self.suite.make_groups(self, model, equal_rewards=equal_rewards))

    def train_step(
        self, model: art.TrainableModel, groups: list[art.TrajectoryGroup], **options: Any
    ) -> art.TrainResult:
        """One ``backend.train`` at the suite's learning rate unless ``options`` say otherwise (the kit's own
        helper: it forwards to the backend's typed keywords, so an option the backend lacks is its TypeError)."""
        result: art.TrainResult = self.run(
            self.backend.train(model, groups, **{"learning_rate": self.suite.learning_rate, **options})
        )
        return result

    def sample(
        self,
        model: art.TrainableModel,
        step: int | None,
        count: int,
        *,
        prompt: str,
        seed: int,
        max_tokens: int = 1,
        temperature: float = 1.0,
    ) -> list[Sample]:
        """``count`` seeded completions of ``prompt`` at ``step`` (None: the latest), with their reported logprobs."""
        return self.run(
            sample_many(
                model.openai_client(),
                model.get_inference_name(step),
                prompt,
                count,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
            )
        )

    def close(self) -> None:
        try:
            self.run(self.backend.close())
        finally:
            self.runner.close()

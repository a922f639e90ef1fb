"""``BackendConformance``: the contract every backend meets, as one pytest class to subclass.

::

    from art_core.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend(self, tmp_path):
            return MyBackend(path=tmp_path)

        @pytest.fixture
        def base_model(self):
            return "my-org/tiny-model"

Capability flags skip what a backend does not claim. Tests run their coroutines on the kit's own event loop
with a timeout, so a hang fails the test instead of the CI job; pytest-asyncio is not needed. Pin the art-core
version your suite was written against: new checks arrive with new versions.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import pytest

import art_core as art
from art_core.migration import train_options
from art_core.testing.quick import (
    protocol_problems,
    result_type,
    train_signature_problems,
    unsupported_options,
)
from art_core.trajectories import is_choice

T = TypeVar("T")

REQUIRED_METRIC_KEYS = (
    "loss/train",
    "loss/learning_rate",
    "data/step_num_groups_submitted",
    "data/step_num_groups_trainable",
    "data/step_num_trajectories",
    "time/step_trainer_s",
)
PROMPTS = ("Sort these letters: d a c", "Sort these letters: b j e", "Sort these letters: h c f")


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
            pytest.fail(f"a backend call did not finish within {timeout} s (a hang)")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class Kit:
    """What each conformance test works with: the backend, a runner and helpers to make models and groups."""

    def __init__(self, suite: BackendConformance, backend: Any, base_model: str, base_path: Path) -> None:
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

    def train(self, model: art.TrainableModel, groups: list[art.TrajectoryGroup]) -> art.TrainResult:
        """One ``backend.train`` at the suite's learning rate (the one option every backend has)."""
        result: art.TrainResult = self.run(
            self.backend.train(model, groups, learning_rate=self.suite.learning_rate)
        )
        return result

    def close(self) -> None:
        try:
            self.run(self.backend.close())
        finally:
            self.runner.close()


class BackendConformance:
    """Subclass and override the ``backend`` and ``base_model`` fixtures; flags skip unclaimed capabilities."""

    supports_inference: ClassVar[bool] = True
    supports_delete: ClassVar[bool] = True
    supports_resume: ClassVar[bool] = True
    learning_rate: ClassVar[float] = 1e-3
    call_timeout_s: ClassVar[float] = 300.0
    failure_timeout_s: ClassVar[float] = 60.0
    group_size: ClassVar[int] = 4
    max_tokens: ClassVar[int] = 8
    # Standard tests a subclass replaces on purpose, with the reason; any other override fails the guard test.
    deliberately_overridden: ClassVar[dict[str, str]] = {}

    # -- fixtures to override ---------------------------------------------------------------------------------

    @pytest.fixture
    def backend(self) -> Any:
        """Override: return a new backend instance (its storage under ``tmp_path`` if it has any)."""
        pytest.fail(f"{type(self).__name__} must override the `backend` fixture")

    @pytest.fixture
    def base_model(self) -> str:
        """Override: the base model the backend trains in these tests (keep it tiny)."""
        pytest.fail(f"{type(self).__name__} must override the `base_model` fixture")

    @pytest.fixture
    def fresh_backend(self, backend: Any) -> Callable[[], Any]:
        """Override when ``supports_resume``: a factory for a new instance on the same storage as ``backend``."""
        pytest.skip("override the `fresh_backend` fixture to check that steps survive a new backend instance")

    async def make_groups(
        self, kit: Kit, model: art.TrainableModel, *, equal_rewards: bool
    ) -> list[art.TrajectoryGroup]:
        """Rollouts through ``model.openai_client()`` with logprobs; override for backends without inference."""
        if not self.supports_inference:
            pytest.skip("override make_groups to give a backend without inference trainable groups")
        client = model.openai_client()

        async def rollout(prompt: str, index: int) -> art.Trajectory:
            messages: list[Any] = [{"role": "user", "content": prompt}]
            completion = await client.chat.completions.create(
                model=model.get_inference_name(),
                messages=messages,
                max_tokens=self.max_tokens,
                logprobs=True,
                temperature=1.0,
            )
            reward = 1.0 if equal_rewards else float(index)
            return art.Trajectory(messages_and_choices=[*messages, completion.choices[0]], reward=reward)

        return await art.gather_trajectory_groups(
            (
                art.TrajectoryGroup(rollout(prompt, i) for i in range(self.group_size))
                for prompt in PROMPTS[:2]
            ),
            pbar_desc=None,
        )

    @pytest.fixture
    def kit(self, backend: Any, base_model: str, tmp_path: Path) -> Iterator[Kit]:
        kit = Kit(self, backend, base_model, tmp_path / "models")
        try:
            yield kit
        finally:
            kit.close()

    # -- the contract ------------------------------------------------------------------------------------------

    def test_no_standard_test_is_silently_overridden(self) -> None:
        for name, member in vars(BackendConformance).items():
            if not name.startswith("test_") or name in self.deliberately_overridden:
                continue
            if getattr(type(self), name) is not member:
                pytest.fail(
                    f"{type(self).__name__} overrides {name}; list it in deliberately_overridden with a reason"
                )

    def test_structure_matches_trainable_backend(self, backend: Any) -> None:
        assert isinstance(backend, art.TrainableBackend)
        assert protocol_problems(type(backend)) == []

    def test_train_signature_has_the_common_subset_and_no_kwargs(self, backend: Any) -> None:
        assert train_signature_problems(type(backend).train) == []
        returned = result_type(type(backend).train)
        assert returned is not None and issubclass(returned, art.TrainResult)

    def test_unknown_option_is_a_type_error(self, kit: Kit) -> None:
        model = kit.registered_model()
        step = kit.run(kit.backend._get_step(model))
        for name in [*unsupported_options(type(kit.backend).train), "definitely_not_an_option"]:
            with pytest.raises(TypeError, match=re.escape(name)):
                kit.run(kit.backend.train(model, [], **{name: True}), self.failure_timeout_s)
        assert kit.run(kit.backend._get_step(model)) == step

    def test_deprecated_model_train_refuses_an_option_the_backend_lacks(self, kit: Kit) -> None:
        """ART's ``model.train(groups, _config=...)`` maps keys onto train() options; a missing one is a TypeError."""
        model = kit.registered_model()
        options, _ = train_options(kit.backend.train)
        lacking = next(key for key in art.dev.TrainConfig.__annotations__ if key not in options)
        dev_config = cast("art.dev.TrainConfig", {lacking: True})

        async def old_style_call() -> tuple[str, list[str]]:
            with warnings.catch_warnings(record=True) as caught:  # on the loop's thread, where it is raised
                warnings.simplefilter("always")
                with pytest.raises(TypeError) as error:
                    await model.train([], _config=dev_config)
            return str(error.value), [str(w.message) for w in caught if w.category is DeprecationWarning]

        message, deprecations = kit.run(old_style_call(), self.failure_timeout_s)
        assert f"has no option {lacking} (from _config); its options are: " in message
        assert any("backend.train(model, " in text for text in deprecations), deprecations
        assert kit.run(model.get_step()) == 0
        assert not (model.output_dir() / "history.jsonl").exists()

    def test_train_advances_the_step_and_returns_its_result_type(self, kit: Kit) -> None:
        model = kit.registered_model()
        before = kit.run(model.get_step())
        result = kit.train(model, kit.groups(model))
        returned = result_type(type(kit.backend).train)
        assert returned is not None and isinstance(result, returned)
        assert result.step == before + 1 == kit.run(model.get_step())
        missing = [key for key in REQUIRED_METRIC_KEYS if key not in result.metrics]
        assert not missing, f"train() metrics lack {missing}"
        assert all(isinstance(v, float) and math.isfinite(v) for v in result.metrics.values()), result.metrics
        assert result.metrics["data/step_num_groups_trainable"] == 2
        logged = [name for name in ("history.jsonl", "trajectories") if (model.output_dir() / name).exists()]
        assert not logged, f"train() wrote {logged}: backends never log; the caller calls model.log"

    def test_zero_variance_groups_are_reported_not_a_crash(self, kit: Kit) -> None:
        model = kit.registered_model()
        result = kit.train(model, kit.groups(model, equal_rewards=True))
        assert result.metrics["data/step_num_groups_trainable"] == 0
        assert result.metrics["data/step_num_groups_submitted"] == 2
        assert result.step == 1

    def test_failures_surface_as_exceptions_within_a_timeout(self, kit: Kit) -> None:
        model = kit.registered_model()
        groups = kit.groups(model)
        groups[1].trajectories[2].reward = math.nan
        with pytest.raises(ValueError, match="trajectory 2 in group 1"):
            kit.run(kit.backend.train(model, groups), self.failure_timeout_s)
        with pytest.raises(ValueError, match="advantage_balance"):
            kit.run(
                kit.backend.train(model, kit.groups(model), advantage_balance=2.0), self.failure_timeout_s
            )
        with pytest.raises(ValueError, match="empty"):
            kit.run(kit.backend.train(model, []), self.failure_timeout_s)
        unscored = kit.groups(model)  # answers without logprobs (allow_training_without_logprobs is off)
        for group in unscored:
            for trajectory in group.trajectories:
                trajectory.messages_and_choices = [
                    item.model_copy(update={"logprobs": None}) if is_choice(item) else item
                    for item in trajectory.messages_and_choices
                ]
        try:
            kit.run(kit.backend.train(model, unscored), self.failure_timeout_s)
        except Exception as error:
            assert "logprob" in str(error).lower(), f"the error should say what is wrong: {error!r}"
        else:
            pytest.fail(
                "train() accepted answers without logprobs although allow_training_without_logprobs is off"
            )
        assert kit.run(model.get_step()) == 0

    def test_delete_checkpoint_files_keeps_exactly_the_given_steps(self, kit: Kit) -> None:
        if not (self.supports_delete and self.supports_inference):
            pytest.skip("needs supports_delete and supports_inference")
        import openai

        model = kit.registered_model()
        for _ in range(3):
            kit.train(model, kit.groups(model))
        kit.run(kit.backend._delete_checkpoint_files(model, [1, 3]))
        client = model.openai_client()

        async def ask(step: int) -> Any:
            return await client.chat.completions.create(
                model=model.get_inference_name(step),
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
            )

        for kept in (1, 3):
            assert kit.run(ask(kept)).choices
        with pytest.raises(openai.NotFoundError):
            kit.run(ask(2))
        assert kit.run(model.get_step()) == 3

    def test_step_survives_a_fresh_backend_instance(self, kit: Kit, fresh_backend: Callable[[], Any]) -> None:
        if not self.supports_resume:
            pytest.skip("supports_resume is False")
        model = kit.registered_model()
        kit.train(model, kit.groups(model))
        kit.run(kit.backend.close())
        again = fresh_backend()
        reopened = kit.new_model(model.name)
        try:
            kit.run(reopened.register(again))
            assert kit.run(reopened.get_step()) == 1
        finally:
            kit.run(again.close())

    def test_inference_name_at_a_step_answers_with_token_ids(self, kit: Kit) -> None:
        if not self.supports_inference:
            pytest.skip("supports_inference is False")
        model = kit.registered_model()
        kit.train(model, kit.groups(model))
        client = model.openai_client()
        for name in (model.get_inference_name(), model.get_inference_name(1), model.get_inference_name(0)):
            completion = kit.run(
                client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True
                )
            )
            choice = completion.choices[0]
            assert choice.logprobs is not None and choice.logprobs.content
            assert all(entry.token.startswith("token_id:") for entry in choice.logprobs.content)

    def test_endpoint_lists_models_and_refuses_a_wrong_api_key(self, kit: Kit) -> None:
        if not self.supports_inference:
            pytest.skip("supports_inference is False")
        import openai

        model = kit.registered_model()

        async def list_models() -> list[str]:
            return [entry.id async for entry in model.openai_client().models.list()]

        assert isinstance(kit.run(list_models()), list)
        stranger = openai.AsyncOpenAI(base_url=model.inference_base_url, api_key="not-the-key", max_retries=0)
        try:
            with pytest.raises(openai.AuthenticationError):
                kit.run(
                    stranger.chat.completions.create(
                        model=model.get_inference_name(),
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=2,
                    )
                )
        finally:
            kit.run(stranger.close())

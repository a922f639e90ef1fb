"""The settings and fixtures every part of ``BackendConformance`` shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import art_core as art
from art_core.testing.kit import Kit, violation

PROMPTS = ("Sort these letters: d a c", "Sort these letters: b j e", "Sort these letters: h c f")


class SuiteBase:
    """Capability flags, tuning knobs and the fixtures a backend author overrides."""

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
        if not self.supports_resume:
            pytest.skip("supports_resume is False")
        violation(
            f"{type(self).__name__} claims supports_resume = True but does not override the `fresh_backend` "
            "fixture, so the claim cannot be checked",
            "a claimed capability is checked, never skipped: override `fresh_backend` (a factory for a new "
            "instance on the same storage) or set supports_resume = False",
        )

    async def make_groups(
        self, kit: Kit, model: art.TrainableModel, *, equal_rewards: bool
    ) -> list[art.TrajectoryGroup]:
        """Rollouts through ``model.openai_client()`` with logprobs; override for backends without inference."""
        if not self.supports_inference:
            violation(
                f"{type(self).__name__} sets supports_inference = False but does not override make_groups",
                "a backend without inference overrides make_groups to give the kit trainable groups",
            )
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

    def needs_inference(self) -> None:
        if not self.supports_inference:
            pytest.skip("supports_inference is False")

"""Broken backends for testing the conformance kit: each is ``StrictBackend`` with exactly one defect.

``tests/test_conformance_mutants.py`` runs the kit on each and requires that a named kit test fails with a
message naming the defect and the rule. A kit that passes one of these would pass a backend that does not work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler
from typing import Any

import art_core as art
from art_core.testing import StrictBackend
from art_core.testing.strict import VOCAB_SIZE, _Completion, softmax
from art_core.testing.strict_server import StrictServer


class FrozenPolicy(StrictBackend):
    """train() advances the step but the new checkpoint is the old policy."""

    async def train(
        self, model: Any, trajectory_groups: Iterable[art.TrajectoryGroup], /, **options: Any
    ) -> Any:
        result = await super().train(model, trajectory_groups, **options)
        checkpoints = self._checkpoints(model.name)
        checkpoints[result.step] = list(checkpoints[result.step - 1])
        return result


class ConstantLogprobs(StrictBackend):
    """The endpoint reports the same made-up logprob for every token."""

    def _sample(self, served_name: str, max_tokens: int, temperature: float, seed: int | None) -> _Completion:
        real = super()._sample(served_name, max_tokens, temperature, seed)
        return _Completion(real.token_ids, [-1.0] * len(real.token_ids), real.finish_reason)


class TemperedLogprobs(StrictBackend):
    """The endpoint reports the logprobs of the tempered sampling distribution, not the model's."""

    def _sample(self, served_name: str, max_tokens: int, temperature: float, seed: int | None) -> _Completion:
        real = super()._sample(served_name, max_tokens, temperature, seed)
        name, _, raw_step = served_name.partition("@")
        checkpoints = self._checkpoints(name)
        logits = checkpoints[int(raw_step) if raw_step else max(checkpoints)]
        tempered = softmax([value / max(temperature, 1e-6) for value in logits])
        return _Completion(
            real.token_ids, [math.log(tempered[t]) for t in real.token_ids], real.finish_reason
        )


class EmptyModelList(StrictBackend):
    """GET /v1/models answers an empty list."""

    def _served(self) -> list[str]:
        return []


class KeepsAStepItWasNotAskedToKeep(StrictBackend):
    """_delete_checkpoint_files keeps step 0 whatever it is told."""

    async def _delete_checkpoint_files(self, model: Any, steps_to_keep: list[int]) -> None:
        await super()._delete_checkpoint_files(model, [*steps_to_keep, 0])


class UnknownNamesServeTheLatest(StrictBackend):
    """An unknown model name or step answers 200 with some registered model's latest policy."""

    def _sample(self, served_name: str, max_tokens: int, temperature: float, seed: int | None) -> _Completion:
        try:
            return super()._sample(served_name, max_tokens, temperature, seed)
        except (LookupError, ValueError):
            fallback = next(iter(self._models))
            return super()._sample(fallback, max_tokens, temperature, seed)


def _ignoring(option: str, default: object) -> type[StrictBackend]:
    class IgnoresOption(StrictBackend):
        async def train(
            self, model: Any, groups: Iterable[art.TrajectoryGroup], /, **options: Any
        ) -> art.TrainResult:
            return await super().train(model, groups, **{**options, option: default})

    IgnoresOption.__name__ = IgnoresOption.__qualname__ = "Ignores_" + option
    IgnoresOption.__doc__ = f"train() accepts {option} and trains as if it were {default!r}."
    return IgnoresOption


IgnoresPpo = _ignoring("ppo", False)
IgnoresEpsilon = _ignoring("epsilon", None)
IgnoresScaleRewards = _ignoring("scale_rewards", True)
IgnoresImportanceSamplingLevel = _ignoring("importance_sampling_level", "token")


class SignBlindLoss(StrictBackend):
    """The loss weighs every trajectory by |advantage|: the reward's sign is lost."""

    def _samples(self, groups: list[art.TrajectoryGroup], scale_rewards: bool) -> list[Any]:
        return [
            type(s)(s.token_ids, s.old_logprobs, abs(s.advantage))
            for s in super()._samples(groups, scale_rewards)
        ]


class LogsItsOwnSteps(StrictBackend):
    """train() calls model.log itself."""

    async def train(
        self, model: Any, groups: Iterable[art.TrajectoryGroup], /, **options: Any
    ) -> art.TrainResult:
        groups = list(groups)
        result = await super().train(model, groups, **options)
        await model.log(groups, metrics=result.metrics, step=result.step)
        return result


class SwallowsUnknownOptions(StrictBackend):
    """train() takes **options and drops the ones it does not know (what the contract forbids)."""

    async def train(  # type: ignore[override]
        self,
        model: Any,
        groups: Iterable[art.TrajectoryGroup],
        /,
        *,
        learning_rate: float = 5e-6,
        **options: Any,
    ) -> art.TrainResult:
        known = {
            "ppo",
            "epsilon",
            "epsilon_high",
            "advantage_balance",
            "scale_rewards",
            "importance_sampling_level",
        }
        kept = {name: value for name, value in options.items() if name in known}
        return await super().train(model, groups, learning_rate=learning_rate, **kept)


class RestartsAtStepZero(StrictBackend):
    """A new instance on the same storage starts the model over at step 0."""

    async def register(self, model: Any) -> None:
        with self.storage.lock:
            self.storage.checkpoints[model.name] = {0: [0.0] * VOCAB_SIZE}
        await super().register(model)


class _ModelsWithoutKey(StrictServer):
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        checked = super()._handler()

        class Handler(checked):  # type: ignore[valid-type,misc]
            def _authorized(self) -> bool:
                return self.path == "/v1/models" or bool(super()._authorized())

        return Handler


class IgnoresTheKeyOnOneRoute(StrictBackend):
    """GET /v1/models answers without an API key."""

    async def _prepare_backend_for_training(self, model: Any) -> tuple[str, str]:
        if self._server is None:
            self._server = _ModelsWithoutKey(self._sample, self._served)
            self._server.start()
        return self._server.base_url, self._server.api_key


class AcceptsNanRewards(StrictBackend):
    """train() turns a NaN reward into 0 instead of refusing it."""

    async def train(
        self, model: Any, groups: Iterable[art.TrajectoryGroup], /, **options: Any
    ) -> art.TrainResult:
        groups = list(groups)
        for group in groups:
            for trajectory in group.trajectories:
                if not math.isfinite(trajectory.reward):
                    trajectory.reward = 0.0
        return await super().train(model, groups, **options)


class SkipsASteps(StrictBackend):
    """Each train() call moves the step counter by two."""

    async def train(
        self, model: Any, groups: Iterable[art.TrajectoryGroup], /, **options: Any
    ) -> art.TrainResult:
        result = await super().train(model, groups, **options)
        checkpoints = self._checkpoints(model.name)
        checkpoints[result.step + 1] = checkpoints.pop(result.step)
        return art.TrainResult(step=result.step + 1, metrics=result.metrics)


class IntegerMetric(StrictBackend):
    """A metric is an int, not a float."""

    async def train(
        self, model: Any, groups: Iterable[art.TrajectoryGroup], /, **options: Any
    ) -> art.TrainResult:
        result = await super().train(model, groups, **options)
        metrics = {
            **result.metrics,
            "data/step_num_trajectories": int(result.metrics["data/step_num_trajectories"]),
        }
        return art.TrainResult(step=result.step, metrics=metrics)


class ClampsAnInfiniteLearningRate(StrictBackend):
    """train() replaces a non-finite learning_rate by the default instead of refusing it."""

    async def train(
        self, model: Any, groups: Iterable[art.TrajectoryGroup], /, **options: Any
    ) -> art.TrainResult:
        if not math.isfinite(options.get("learning_rate", 1.0)):
            options["learning_rate"] = 5e-6
        return await super().train(model, groups, **options)


class ItsOwnLearningRateMessage(StrictBackend):
    """train() refuses learning_rate <= 0 with a message of its own (every backend's differs)."""

    async def train(
        self, model: Any, groups: Iterable[art.TrajectoryGroup], /, **options: Any
    ) -> art.TrainResult:
        if options.get("learning_rate", 1.0) <= 0:
            raise ValueError(f"bad learning rate {options['learning_rate']}")
        return await super().train(model, groups, **options)


# mutant -> (the kit test that must fail, fragments its message must contain: the defect, then the rule)
EXPECTED: dict[type[StrictBackend], tuple[str, tuple[str, ...]]] = {
    FrozenPolicy: (
        "test_training_moves_the_policy_toward_the_rewards",
        ("not higher", "toward what the batch rewards"),
    ),
    ConstantLogprobs: ("test_reported_logprobs_are_the_models", ("summing to", "untempered model's")),
    TemperedLogprobs: (
        "test_reported_logprobs_are_the_models",
        ("follow the temperature", "at any temperature"),
    ),
    EmptyModelList: ("test_models_route_lists_the_served_names", ("lists []", "lists every name")),
    KeepsAStepItWasNotAskedToKeep: (
        "test_delete_checkpoint_files_keeps_exactly_the_given_steps",
        ("step 0 was not in steps_to_keep=[1, 3] but answered 200", "keeps exactly those steps"),
    ),
    UnknownNamesServeTheLatest: ("test_unknown_names_are_404_on_every_route", ("answered 200", "is a 404")),
    IgnoresPpo: ("test_each_common_option_changes_the_trained_policy", ("ppo=True", "never ignored")),
    IgnoresEpsilon: ("test_each_common_option_changes_the_trained_policy", ("epsilon=0.3", "never ignored")),
    IgnoresScaleRewards: (
        "test_each_common_option_changes_the_trained_policy",
        ("scale_rewards=False", "never ignored"),
    ),
    IgnoresImportanceSamplingLevel: (
        "test_each_common_option_changes_the_trained_policy",
        ("importance_sampling_level='sequence'", "never ignored"),
    ),
    SignBlindLoss: (
        "test_training_moves_the_policy_toward_the_rewards",
        ("sign is ignored", "away from what it penalises"),
    ),
    LogsItsOwnSteps: (
        "test_train_advances_the_step_and_returns_its_result_type",
        ("wrote ['history.jsonl'", "never log"),
    ),
    SwallowsUnknownOptions: (
        "test_deprecated_model_train_refuses_an_option_the_backend_lacks",
        ("was accepted silently", "is a TypeError listing its options"),
    ),
    RestartsAtStepZero: (
        "test_step_survives_a_fresh_backend_instance",
        ("reports step 0", "supports_resume"),
    ),
    IgnoresTheKeyOnOneRoute: (
        "test_a_wrong_or_missing_api_key_is_refused_on_every_route",
        ("GET", "/models with a wrong API key answered 200", "refuses a wrong or missing API key"),
    ),
    ClampsAnInfiniteLearningRate: (
        "test_bad_common_option_values_are_refused_alike",
        ("learning_rate=inf raised", "as art_core.TrainOptions does"),
    ),
    ItsOwnLearningRateMessage: (
        "test_bad_common_option_values_are_refused_alike",
        ("learning_rate=0.0 raised 'bad learning rate 0.0'", "the same ValueError for the same bad value"),
    ),
    AcceptsNanRewards: (
        "test_failures_surface_as_exceptions_within_a_timeout",
        ("NaN reward", "rewards must be finite"),
    ),
    SkipsASteps: (
        "test_train_advances_the_step_and_returns_its_result_type",
        ("result.step=2", "by exactly one"),
    ),
    IntegerMetric: (
        "test_train_advances_the_step_and_returns_its_result_type",
        ("data/step_num_trajectories = 8 is int, not float", "finite floats"),
    ),
}

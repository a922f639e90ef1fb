"""The training half of the contract: the class, the train() signature, steps, results, failures, resume."""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable
from typing import Any, cast

import pytest

import art_core as art
from art_core.backend import COMMON_TRAIN_DEFAULTS
from art_core.migration import train_options
from art_core.testing.kit import Kit, violation
from art_core.testing.option_checks import OptionChecks
from art_core.testing.quick import (
    protocol_problems,
    result_type,
    train_signature_problems,
    unsupported_options,
)
from art_core.trajectories import is_choice

REQUIRED_METRIC_KEYS = (
    "loss/train",
    "loss/learning_rate",
    "data/step_num_groups_submitted",
    "data/step_num_groups_trainable",
    "data/step_num_trajectories",
    "time/step_trainer_s",
)
METRICS_RULE = "train() metrics are finite floats under the keys of docs/rl-math.md §4"


def metric_problems(metrics: dict[str, Any]) -> list[str]:
    """Each metric that is not a finite float, by key, and each required key that is missing."""
    problems = [f"{key} is missing" for key in REQUIRED_METRIC_KEYS if key not in metrics]
    for key, value in metrics.items():
        if not isinstance(value, float):
            problems.append(
                f"{key} = {value!r} is {type(value).__name__}, not float (return float({value!r}))"
            )
        elif not math.isfinite(value):
            problems.append(f"{key} = {value!r} is not finite")
    return problems


def expect_refusal(
    kit: Kit, call: Callable[[], Any], error: type[Exception], match: str, defect: str, rule: str
) -> None:
    """Run ``call()`` (a coroutine) and require ``error`` matching ``match``; otherwise name the defect."""
    try:
        kit.run(call(), kit.suite.failure_timeout_s)
    except error as raised:
        if not re.search(match, str(raised)):
            violation(f"{defect}: the {error.__name__} says {str(raised)!r}, not {match!r}", rule)
        return
    violation(f"{defect}: train() returned without raising {error.__name__}", rule)


class TrainingChecks(OptionChecks):  # the common options' bounds: option_checks.py
    def test_structure_matches_trainable_backend(self, backend: Any) -> None:
        problems = protocol_problems(type(backend))
        if problems or not isinstance(backend, art.TrainableBackend):
            violation(
                f"{type(backend).__name__}: {problems or 'not an art.TrainableBackend'}",
                "a backend has every method of art.TrainableBackend, async where the Protocol says so",
            )

    def test_train_signature_has_the_common_subset_and_no_kwargs(self, backend: Any) -> None:
        problems = train_signature_problems(type(backend).train)
        returned = result_type(type(backend).train)
        if returned is None or not issubclass(returned, art.TrainResult):
            problems.append(f"train() is annotated to return {returned!r}, not a TrainResult subclass")
        if problems:
            violation(
                f"{type(backend).__name__}.train(): " + "; ".join(problems),
                "train(model, trajectory_groups, /, *, <common options with their defaults>, <own options>) "
                "-> TrainResult, never **kwargs (docs/architecture.md §4.3)",
            )

    def test_unknown_option_is_a_type_error(self, kit: Kit) -> None:
        model = kit.registered_model()
        step = kit.run(kit.backend._get_step(model))
        for name in [*unsupported_options(type(kit.backend).train), "definitely_not_an_option"]:
            expect_refusal(
                kit,
                functools.partial(kit.backend.train, model, [], **{name: True}),
                TypeError,
                re.escape(name),
                f"train(model, [], {name}=True) was accepted",
                "an option train() does not declare is a TypeError naming it, never silently ignored",
            )
        if kit.run(kit.backend._get_step(model)) != step:
            violation("a refused train() call changed the step", "a refused call changes nothing")

    def test_deprecated_model_train_refuses_an_option_the_backend_lacks(self, kit: Kit) -> None:
        """ART's ``model.train(groups, _config=...)`` maps keys onto train() options; a missing one is a TypeError."""
        model = kit.registered_model()
        options, _ = train_options(kit.backend.train)
        lacking = [
            key
            for key in art.dev.TrainConfig.__annotations__
            if key not in options and key not in COMMON_TRAIN_DEFAULTS
        ]
        rule = "model.train(groups, _config={key: ...}) with a key train() lacks is a TypeError listing its options"
        if not lacking:
            pytest.skip("train() declares every key of art.dev.TrainConfig")
        dev_config = cast("art.dev.TrainConfig", {lacking[0]: True})

        async def old_style_call() -> tuple[Exception | None, list[str]]:
            with warnings.catch_warnings(record=True) as caught:  # on the loop's thread, where it is raised
                warnings.simplefilter("always")
                try:
                    await model.train([], _config=dev_config)
                except Exception as error:
                    raised: Exception | None = error
                else:
                    raised = None
            return raised, [str(w.message) for w in caught if w.category is DeprecationWarning]

        raised, deprecations = kit.run(old_style_call(), self.failure_timeout_s)
        call = f"model.train([], _config={{{lacking[0]!r}: True}})"
        if not isinstance(raised, TypeError):
            went_on = "returned" if raised is None else f"went on into train(), which raised {raised!r}"
            violation(f"{call} was accepted silently: it {went_on}", rule)
        if f"has no option {lacking[0]} (from _config); its options are: " not in str(raised):
            violation(f"{call}: the TypeError says {str(raised)!r}", rule)
        if not any("backend.train(model, " in text for text in deprecations):
            violation(f"no DeprecationWarning pointing at backend.train: {deprecations}", rule)
        if kit.run(model.get_step()) != 0 or (model.output_dir() / "history.jsonl").exists():
            violation("the refused model.train call trained or logged", "a refused call changes nothing")

    def test_train_advances_the_step_and_returns_its_result_type(self, kit: Kit) -> None:
        model = kit.registered_model()
        before = kit.run(model.get_step())
        result = kit.train_step(model, kit.groups(model))
        returned = result_type(type(kit.backend).train)
        if not (isinstance(returned, type) and issubclass(returned, art.TrainResult)):
            returned = art.TrainResult
        if not isinstance(result, returned):
            violation(
                f"train() returned a {type(result).__name__}", "train() returns its declared result type"
            )
        after = kit.run(model.get_step())
        if not result.step == before + 1 == after:
            violation(
                f"one train() call took the step from {before} to result.step={result.step}, "
                f"get_step()={after}",
                "each train() call advances the step by exactly one, and result.step is the new step",
            )
        if problems := metric_problems(dict(result.metrics)):
            violation("train() metrics: " + "; ".join(problems), METRICS_RULE)
        if result.metrics["data/step_num_groups_trainable"] != 2:
            violation(
                f"data/step_num_groups_trainable = {result.metrics['data/step_num_groups_trainable']} "
                "for 2 groups with distinct rewards",
                "data/step_num_groups_trainable counts the groups whose rewards differ",
            )
        logged = [name for name in ("history.jsonl", "trajectories") if (model.output_dir() / name).exists()]
        if logged:
            violation(f"train() wrote {logged}", "backends never log; the caller calls model.log")

    def test_zero_variance_groups_are_reported_not_a_crash(self, kit: Kit) -> None:
        model = kit.registered_model()
        result = kit.train_step(model, kit.groups(model, equal_rewards=True))
        counts = (
            result.metrics["data/step_num_groups_trainable"],
            result.metrics["data/step_num_groups_submitted"],
        )
        if counts != (0, 2) or result.step != 1:
            violation(
                f"2 groups of equal rewards gave (trainable, submitted) = {counts}, step {result.step}",
                "groups without reward variance are counted and reported, and the step still advances",
            )

    def test_failures_surface_as_exceptions_within_a_timeout(self, kit: Kit) -> None:
        model = kit.registered_model()
        groups = kit.groups(model)
        groups[1].trajectories[2].reward = math.nan
        rule = "bad input is an exception naming the bad value and the fix, raised before anything changes"
        expect_refusal(
            kit,
            lambda: kit.backend.train(model, groups),
            ValueError,
            "trajectory 2 in group 1",
            "a NaN reward (trajectory 2 in group 1) was not refused",
            "rewards must be finite: a NaN is a ValueError naming the group and trajectory",
        )
        expect_refusal(
            kit,
            lambda: kit.backend.train(model, kit.groups(model), advantage_balance=2.0),
            ValueError,
            "advantage_balance",
            "advantage_balance=2.0 was not refused",
            rule,
        )
        expect_refusal(
            kit,
            lambda: kit.backend.train(model, []),
            ValueError,
            "empty",
            "an empty batch was not refused",
            rule,
        )
        unscored = kit.groups(model)  # answers without logprobs (allow_training_without_logprobs is off)
        for group in unscored:
            for trajectory in group.trajectories:
                trajectory.messages_and_choices = [
                    item.model_copy(update={"logprobs": None}) if is_choice(item) else item
                    for item in trajectory.messages_and_choices
                ]
        expect_refusal(
            kit,
            lambda: kit.backend.train(model, unscored),
            Exception,
            "(?i)logprob",
            "answers without logprobs were not refused (allow_training_without_logprobs is off)",
            rule,
        )
        if (step := kit.run(model.get_step())) != 0:
            violation(
                f"refused train() calls left the model at step {step}", "a refused call changes nothing"
            )

    def test_step_survives_a_fresh_backend_instance(self, kit: Kit, fresh_backend: Callable[[], Any]) -> None:
        model = kit.registered_model()
        kit.train_step(model, kit.groups(model))
        kit.run(kit.backend.close())
        again = fresh_backend()
        reopened = kit.new_model(model.name)
        try:
            kit.run(reopened.register(again))
            if (step := kit.run(reopened.get_step())) != 1:
                violation(
                    f"a new instance on the same storage reports step {step} for a model trained to step 1",
                    "supports_resume: a new backend instance continues at the step the old one reached",
                )
        finally:
            kit.run(again.close())

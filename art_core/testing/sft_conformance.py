"""The SFT half of the contract, behind ``supports_sft``: ``train_sft()``'s signature, one step per call that
lowers the loss, is served and resumed like a ``train()`` step, and refuses bad options and data by name."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

import art_core as art
from art_core.sft import COMMON_SFT_DEFAULTS
from art_core.testing.kit import Kit, violation
from art_core.testing.quick import result_type
from art_core.testing.suite import SuiteBase

REQUIRED_SFT_METRIC_KEYS = ("loss/sft", "data/sft_examples", "data/sft_trained_tokens")
SFT_RULE = "one train_sft() call is one step of the model, like one train() call (art_core.sft)"


def sft_signature_problems(train_sft: Callable[..., Any]) -> list[str]:
    """How a ``train_sft`` signature departs from ``art.SFTBackend``: names, kinds, defaults, no **kwargs."""
    parameters = list(inspect.signature(train_sft).parameters.values())
    if parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    problems = (
        [] if positional == ["model", "trajectories"] else [f"positional-only parameters are {positional}"]
    )
    problems += [f"takes **{p.name}" for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    by_name = {p.name: p for p in parameters}
    for name, default in COMMON_SFT_DEFAULTS.items():
        option = by_name.get(name)
        if option is None:
            problems.append(f"lacks the common option {name}")
        elif option.kind is not inspect.Parameter.KEYWORD_ONLY or option.default != default:
            problems.append(f"{name} is not keyword-only with default {default!r}")
    returned = result_type(train_sft)
    if returned is None or not issubclass(returned, art.TrainResult):
        problems.append(f"returns {returned!r}, not a TrainResult subclass")
    return problems


def sft_data(count: int = 8) -> list[art.Trajectory]:
    """Short demonstrations: sort three letters (the answer is the target)."""
    letters = ["c a b", "f d e", "j h i", "b a d", "g e f", "i h j", "e c d", "h f g"]
    return [
        art.Trajectory(
            messages_and_choices=[
                {"role": "user", "content": f"Sort these letters: {item}"},
                {"role": "assistant", "content": "".join(sorted(item.split()))},
            ]
        )
        for item in (letters * (count // len(letters) + 1))[:count]
    ]


class SFTChecks(SuiteBase):
    supports_sft: ClassVar[bool] = False
    sft_learning_rate: ClassVar[float] = 1e-2

    def needs_sft(self) -> None:
        if not self.supports_sft:
            pytest.skip("supports_sft is False")

    def sft(self, kit: Kit, model: art.TrainableModel, **options: Any) -> art.TrainResult:
        call = kit.backend.train_sft(
            model, sft_data(), **{"learning_rate": self.sft_learning_rate, "batch_size": 4, **options}
        )
        result: art.TrainResult = kit.run(call)
        return result

    def test_sft_signature_has_the_common_subset_and_no_kwargs(self, backend: Any) -> None:
        self.needs_sft()
        train_sft = getattr(type(backend), "train_sft", None)
        problems = ["has no train_sft"] if train_sft is None else sft_signature_problems(train_sft)
        if problems or not isinstance(backend, art.SFTBackend):
            violation(
                f"{type(backend).__name__}.train_sft(): " + "; ".join(problems or ["not an art.SFTBackend"]),
                "train_sft(model, trajectories, /, *, ...) takes art.SFTBackend's options with its defaults, "
                "no **kwargs, and returns a TrainResult",
            )

    def test_sft_is_one_step_that_lowers_the_loss(self, kit: Kit) -> None:
        self.needs_sft()
        model = kit.registered_model()
        before = kit.run(model.get_step())
        first, second = self.sft(kit, model), self.sft(kit, model)
        if (first.step, second.step, kit.run(model.get_step())) != (before + 1, before + 2, before + 2):
            violation(
                f"two train_sft() calls from step {before} returned steps {first.step}, {second.step}",
                SFT_RULE,
            )
        for result in (first, second):
            missing = [key for key in REQUIRED_SFT_METRIC_KEYS if key not in result.metrics]
            bad = [k for k, v in result.metrics.items() if not (isinstance(v, float) and math.isfinite(v))]
            if missing or bad or result.metrics.get("data/sft_examples") != 8.0:
                violation(
                    f"train_sft() metrics lack {missing}, have non-finite/non-float {bad}, or count "
                    f"{result.metrics.get('data/sft_examples')!r} examples instead of 8",
                    f"train_sft() returns finite float metrics including {REQUIRED_SFT_METRIC_KEYS}",
                )
        if not second.metrics["loss/sft"] < first.metrics["loss/sft"]:
            violation(
                f"loss/sft did not drop on the same data: {first.metrics['loss/sft']:.4f} then "
                f"{second.metrics['loss/sft']:.4f}",
                "train_sft() trains the assistant turns: the loss on data it trained on goes down",
            )

    def test_sft_step_is_served_and_rl_continues_from_it(self, kit: Kit) -> None:
        self.needs_sft()
        model = kit.registered_model()
        result = self.sft(kit, model)
        if self.supports_inference:
            samples = kit.sample(model, result.step, 1, prompt="Sort these letters: c a b", seed=0)
            if not samples:
                violation(f"{model.get_inference_name(result.step)} answered nothing", SFT_RULE)
            groups = kit.groups(model)
            after = kit.train_step(model, groups)
            if after.step != result.step + 1:
                violation(f"train() after SFT step {result.step} returned step {after.step}", SFT_RULE)

    def test_sft_step_survives_a_fresh_backend(self, kit: Kit, fresh_backend: Callable[[], Any]) -> None:
        self.needs_sft()
        if not self.supports_resume:
            pytest.skip("supports_resume is False")
        model = kit.registered_model()
        result = self.sft(kit, model)
        kit.run(kit.backend.close())
        again = kit.new_model(model.name)
        fresh = fresh_backend()
        try:
            kit.run(again.register(fresh))
            step = kit.run(again.get_step())
        finally:
            kit.run(fresh.close())
        if step != result.step:
            violation(f"a fresh backend resumed at step {step}, not the SFT step {result.step}", SFT_RULE)

    def test_sft_refuses_bad_options_and_data_by_name(self, kit: Kit) -> None:
        self.needs_sft()
        model = kit.registered_model()
        no_answer = [art.Trajectory(messages_and_choices=[{"role": "user", "content": "hi"}])]
        for options, data, word in (
            ({"epochs": 0}, sft_data(), "epochs"),
            ({"assistant_turns": "first"}, sft_data(), "assistant_turns"),
            ({}, no_answer, "assistant"),
        ):
            try:
                kit.run(kit.backend.train_sft(model, data, **options), self.failure_timeout_s)
            except ValueError as error:
                if word not in str(error):
                    violation(f"train_sft({options}) raised {error!r}, which does not name {word}", SFT_RULE)
                continue
            violation(
                f"train_sft({options or 'data without an assistant turn'}) did not raise ValueError",
                "a bad SFT option or example is a ValueError naming it, before anything trains",
            )
        if kit.run(model.get_step()) != 0:
            violation("a refused train_sft() call advanced the step", SFT_RULE)

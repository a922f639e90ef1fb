"""The serving half of the contract: names, steps, the model list, the API key, deleted checkpoints."""

from __future__ import annotations

from typing import Any

import pytest

import art_core as art
from art_core.testing.kit import Kit, violation
from art_core.testing.probes import http_status
from art_core.testing.suite import SuiteBase

REFUSED = (401, 403)
UNKNOWN_RULE = (
    "a name the backend does not serve (unknown model, unknown or deleted step) is a 404 on every route"
)
KEY_RULE = "every /v1 route refuses a wrong or missing API key with 401 (or 403)"


def chat_body(name: str) -> dict[str, Any]:
    return {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def routes(model: art.TrainableModel) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(method, url, body) of every route the OpenAI-compatible endpoint must serve."""
    base = str(model.inference_base_url).rstrip("/")
    return [
        ("POST", f"{base}/chat/completions", chat_body(model.get_inference_name())),
        ("GET", f"{base}/models", None),
    ]


def listed_names(kit: Kit, model: art.TrainableModel) -> list[str]:
    async def names() -> list[str]:
        return [entry.id async for entry in model.openai_client().models.list()]

    return kit.run(names())


def chat_status(kit: Kit, model: art.TrainableModel, name: str) -> int:
    base = str(model.inference_base_url).rstrip("/")
    return kit.run(
        http_status("POST", f"{base}/chat/completions", api_key=model.inference_api_key, body=chat_body(name))
    )


class EndpointChecks(SuiteBase):
    def test_inference_name_at_a_step_answers_with_token_ids(self, kit: Kit) -> None:
        self.needs_inference()
        model = kit.registered_model()
        kit.train_step(model, kit.groups(model))
        for step in (None, 1, 0):
            (sample,) = kit.sample(model, step, 1, prompt="hi", seed=0, max_tokens=4)
            if not all(token.startswith("token_id:") for token in sample.tokens):
                violation(
                    f"{model.get_inference_name(step)!r} reported logprob tokens {list(sample.tokens)[:4]}",
                    "with logprobs=True every token is reported as 'token_id:<id>', so a Choice trains as sampled",
                )

    def test_models_route_lists_the_served_names(self, kit: Kit) -> None:
        self.needs_inference()
        model = kit.registered_model()
        names = listed_names(kit, model)
        expected = {model.get_inference_name(), model.get_inference_name(0)}
        if not expected & set(names):
            violation(
                f"GET /v1/models lists {names[:8]}, none of {sorted(expected)}",
                "GET /v1/models lists every name the endpoint serves: the latest and each kept step",
            )

    def test_a_wrong_or_missing_api_key_is_refused_on_every_route(self, kit: Kit) -> None:
        self.needs_inference()
        model = kit.registered_model()
        for method, url, body in routes(model):
            for key, what in (("not-the-key", "a wrong API key"), (None, "no API key")):
                status = kit.run(http_status(method, url, api_key=key, body=body))
                if status not in REFUSED:
                    violation(f"{method} {url} with {what} answered {status}", KEY_RULE)
            status = kit.run(http_status(method, url, api_key=model.inference_api_key, body=body))
            if status != 200:
                violation(
                    f"{method} {url} with the right key answered {status}", "every /v1 route answers the key"
                )

    def test_unknown_names_are_404_on_every_route(self, kit: Kit) -> None:
        self.needs_inference()
        model = kit.registered_model()
        stranger = model.get_inference_name(1).replace(model.name, f"{model.name}-never-registered")
        for name in ("no-such-model-anywhere", model.get_inference_name(999), stranger):
            if (status := chat_status(kit, model, name)) != 404:
                violation(f"POST /chat/completions with model={name!r} answered {status}", UNKNOWN_RULE)
        base = str(model.inference_base_url).rstrip("/")
        for url in (f"{base}/no-such-route", f"{base}/models/no-such-model-anywhere"):
            if (status := kit.run(http_status("GET", url, api_key=model.inference_api_key))) != 404:
                violation(f"GET {url} answered {status}", UNKNOWN_RULE)

    def test_delete_checkpoint_files_keeps_exactly_the_given_steps(self, kit: Kit) -> None:
        if not self.supports_delete:
            pytest.skip("supports_delete is False")
        model = kit.registered_model()
        for _ in range(3):
            kit.train_step(model, kit.groups(model))
        kit.run(kit.backend._delete_checkpoint_files(model, [1, 3]))
        rule = "_delete_checkpoint_files(model, steps) keeps exactly those steps: they answer, all others are 404"
        if (step := kit.run(model.get_step())) != 3:
            violation(f"after keeping steps [1, 3] the model is at step {step}, not 3", rule)
        if not self.supports_inference:
            return
        for kept in (1, 3):
            if (status := chat_status(kit, model, model.get_inference_name(kept))) != 200:
                violation(f"kept step {kept} answered {status}", rule)
        for gone in (0, 2):
            if (status := chat_status(kit, model, model.get_inference_name(gone))) != 404:
                violation(f"step {gone} was not in steps_to_keep=[1, 3] but answered {status}", rule)
        listed = set(listed_names(kit, model))
        stale = [model.get_inference_name(s) for s in (0, 2) if model.get_inference_name(s) in listed]
        if stale:
            violation(f"GET /v1/models still lists the deleted {stale}", rule)

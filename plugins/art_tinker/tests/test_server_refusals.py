"""Bad values sent through the unmodified tinker SDK are refused at once, naming the field and the limit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import tinker
from tinker import types
from tinker_harness import Server

from art_local.tiny import VOCAB_SIZE

CONTEXT = 2048  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def service(server: Server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    yield client
    client.close("success").result(timeout=60)


@pytest.fixture(scope="module")
def client(service: tinker.ServiceClient, tiny_model: str) -> tinker.TrainingClient:
    return service.create_lora_training_client(base_model=tiny_model, rank=2).result(timeout=120)


def _datum(tokens: list[int], **inputs: Any) -> types.Datum:
    targets = inputs.pop("target_tokens", [*tokens[1:], 5])
    weights = inputs.pop("weights", [1.0] * len(tokens))
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, "weights": weights, **inputs},
    )


def _loss(client: tinker.TrainingClient, datum: types.Datum) -> float:
    return float(client.forward([datum], "cross_entropy").result(timeout=120).metrics["loss:sum"])


@pytest.mark.parametrize("token", [10**6, -5, VOCAB_SIZE])
def test_a_token_outside_the_vocabulary_names_the_field_and_the_vocab_size(
    client: tinker.TrainingClient, token: int
) -> None:
    bad = _datum([3, 4, token, 6])
    with pytest.raises(tinker.BadRequestError) as error:
        client.forward_backward([bad], "cross_entropy").result(timeout=60)
    message = str(error.value)
    assert "model_input[2]" in message and f"token id {token}" in message, message
    assert f"[0, {VOCAB_SIZE})" in message, message


@pytest.mark.parametrize("token", [10**6, -5])
def test_a_sampling_prompt_outside_the_vocabulary_is_a_400_naming_the_position(
    service: tinker.ServiceClient, tiny_model: str, token: int
) -> None:
    sampler = service.create_sampling_client(base_model=tiny_model).result(timeout=120)
    with pytest.raises(tinker.BadRequestError) as error:
        sampler.sample(
            prompt=types.ModelInput.from_ints([3, token, 5]),
            num_samples=1,
            sampling_params=types.SamplingParams(max_tokens=2),
        ).result(timeout=60)
    message = str(error.value)
    assert f"prompt[1] is token id {token}" in message and f"[0, {VOCAB_SIZE})" in message, message


def test_a_target_outside_the_vocabulary_is_refused(client: tinker.TrainingClient) -> None:
    bad = _datum([3, 4, 5], target_tokens=[4, 5, 10**6])
    with pytest.raises(tinker.BadRequestError, match=r"target_tokens'\]\[2\] is token id 1000000"):
        client.forward([bad], "cross_entropy").result(timeout=60)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_not_trained_into_a_nan_loss(
    client: tinker.TrainingClient, value: float
) -> None:
    bad = _datum([3, 4, 5], weights=[1.0, value, 1.0])
    with pytest.raises(tinker.BadRequestError, match=r"loss_fn_inputs\['weights'\]\[1\] is (nan|inf)"):
        client.forward_backward([bad], "cross_entropy").result(timeout=60)


def test_non_finite_advantages_are_refused(client: tinker.TrainingClient) -> None:
    bad = _datum([3, 4, 5], logprobs=[-1.0, -1.0, -1.0], advantages=[0.5, float("nan"), 0.5])
    del bad.loss_fn_inputs["weights"]
    with pytest.raises(tinker.BadRequestError, match=r"loss_fn_inputs\['advantages'\]\[1\] is nan"):
        client.forward_backward([bad], "importance_sampling").result(timeout=60)


def test_a_datum_longer_than_the_context_names_the_limit(client: tinker.TrainingClient) -> None:
    bad = _datum([7] * 3000)
    with pytest.raises(tinker.BadRequestError, match=rf"3000 input tokens .*context of {CONTEXT} tokens"):
        client.forward_backward([bad], "cross_entropy").result(timeout=60)


def test_a_loss_config_of_nan_is_refused(client: tinker.TrainingClient) -> None:
    datum = _datum([3, 4, 5], logprobs=[-1.0] * 3, advantages=[0.5] * 3)
    del datum.loss_fn_inputs["weights"]
    with pytest.raises(tinker.BadRequestError, match=r"loss_fn_config\['clip_low_threshold'\]=nan"):
        client.forward_backward([datum], "ppo", loss_fn_config={"clip_low_threshold": float("nan")}).result(
            timeout=60
        )


@pytest.mark.parametrize("rank", [10**6, 0])
def test_a_lora_rank_outside_the_allowed_range_names_it(
    service: tinker.ServiceClient, tiny_model: str, rank: int
) -> None:
    with pytest.raises(tinker.BadRequestError, match=rf"rank={rank} is outside the allowed range \[1, \d+\]"):
        service.create_lora_training_client(base_model=tiny_model, rank=rank).result(timeout=60)


def test_refused_requests_change_nothing_and_the_model_still_trains(client: tinker.TrainingClient) -> None:
    good = _datum([3, 4, 5, 6])
    before = _loss(client, good)
    for bad in (_datum([3, 10**6]), _datum([3, 4], weights=[float("nan"), 1.0]), _datum([7] * 3000)):
        with pytest.raises(tinker.BadRequestError):
            client.forward_backward([bad], "cross_entropy").result(timeout=60)
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
    assert _loss(client, good) == pytest.approx(before, abs=1e-6), "a refused request left gradients behind"
    client.forward_backward([good], "cross_entropy").result(timeout=120)
    client.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
    assert _loss(client, good) < before

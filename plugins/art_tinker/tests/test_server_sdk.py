"""The unmodified tinker SDK against ``art tinker serve`` (a real subprocess on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tinker
from tinker import types
from tinker_harness import Server


@pytest.fixture(scope="module")
def service(server: Server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    yield client
    client.close("success").result(timeout=60)


def _sft_datum(tokenizer: Any) -> types.Datum:
    text = "<|im_start|>user\nSort these letters: c a b<|im_end|>\n<|im_start|>assistant\nabc<|im_end|>\n"
    sequence = tokenizer.encode(text)
    return types.Datum(
        model_input=types.ModelInput.from_ints(sequence[:-1]),
        loss_fn_inputs={"target_tokens": sequence[1:], "weights": [1.0] * (len(sequence) - 1)},
    )


def _loss(client: tinker.TrainingClient, datum: types.Datum) -> float:
    return float(client.forward([datum], "cross_entropy").result(timeout=120).metrics["loss:sum"])


def test_train_save_resume_sample_list_and_delete(
    service: tinker.ServiceClient, server: Server, tiny_model: str
) -> None:
    client = service.create_lora_training_client(base_model=tiny_model, rank=4, train_unembed=False).result(
        timeout=120
    )
    assert client.get_info().lora_rank == 4
    datum = _sft_datum(client.get_tokenizer())
    before = client.forward([datum], "cross_entropy").result(timeout=120)
    logprobs = before.loss_fn_outputs[0]["logprobs"].tolist()
    assert len(logprobs) == len(datum.loss_fn_inputs["target_tokens"].data)
    assert before.metrics["loss:sum"] == pytest.approx(-sum(logprobs), rel=1e-5)
    for _ in range(3):  # requests pipelined: the server runs them in seq_id order
        backward = client.forward_backward([datum], "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=2e-2)).result(timeout=120)
        backward.result(timeout=120)
    trained = _loss(client, datum)
    assert trained < before.metrics["loss:sum"] - 1.0

    state = client.save_state("sft-1").result(timeout=120)
    sampler_path = client.save_weights_for_sampler("sft-1").result(timeout=120).path
    assert state.path.endswith("/weights/sft-1") and sampler_path.endswith("/sampler_weights/sft-1")
    resumed = service.create_training_client_from_state_with_optimizer(state.path).result(timeout=120)
    weights_only = service.create_training_client_from_state(state.path).result(timeout=120)
    assert resumed.model_id != client.model_id
    assert _loss(resumed, datum) == pytest.approx(trained, abs=1e-4)
    assert _loss(weights_only, datum) == pytest.approx(trained, abs=1e-4)

    # the sampler serves the trained weights: its logprob of a sampled token is the trainer's
    sampler = service.create_sampling_client(model_path=sampler_path).result(timeout=120)
    prompt = datum.model_input.to_ints()[:-3]
    params = types.SamplingParams(max_tokens=4, seed=11, temperature=1.0)
    first = sampler.sample(types.ModelInput.from_ints(prompt), 2, params).result(timeout=120)
    again = sampler.sample(types.ModelInput.from_ints(prompt), 2, params).result(timeout=120)
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert all(s.sequence_id for s in first.sequences)
    token, sampled_logprob = first.sequences[0].tokens[0], first.sequences[0].logprobs[0]
    probe = types.Datum(
        model_input=types.ModelInput.from_ints(prompt), loss_fn_inputs={"target_tokens": [*prompt[1:], token]}
    )
    trainer_logprob = (
        client.forward([probe], "cross_entropy").result(timeout=120).loss_fn_outputs[0]["logprobs"]
    )
    assert trainer_logprob.tolist()[-1] == pytest.approx(sampled_logprob, abs=1e-4)

    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    listed = {
        c.checkpoint_id: c.checkpoint_type
        for c in rest.list_checkpoints(client.model_id).result().checkpoints
    }
    assert listed == {"weights/sft-1": "training", "sampler_weights/sft-1": "sampler"}
    rest.delete_checkpoint_from_tinker_path(state.path).result(timeout=60)
    assert [c.checkpoint_id for c in rest.list_checkpoints(client.model_id).result().checkpoints] == [
        "sampler_weights/sft-1"
    ]
    with pytest.raises(tinker.NotFoundError, match="does not exist"):
        service.create_training_client_from_state(state.path).result(timeout=60)


def test_custom_loss_takes_the_same_step_as_the_equivalent_builtin(
    service: tinker.ServiceClient, tiny_model: str
) -> None:
    builtin = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=3).result(timeout=120)
    custom = service.create_lora_training_client(base_model=tiny_model, rank=4, seed=3).result(timeout=120)
    datum = _sft_datum(builtin.get_tokenizer())

    def negative_log_likelihood(data: list[types.Datum], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        loss = sum(
            -(lp * d.loss_fn_inputs["weights"].to_torch()).sum()
            for d, lp in zip(data, logprobs, strict=False)
        )
        return loss, {}

    expected = builtin.forward_backward([datum], "cross_entropy").result(timeout=120).metrics["loss:sum"]
    got = custom.forward_backward_custom([datum], negative_log_likelihood).result(timeout=120)
    assert got.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    for client in (builtin, custom):
        client.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=120)
    assert _loss(custom, datum) == pytest.approx(_loss(builtin, datum), rel=1e-5)
    assert _loss(custom, datum) < expected


def test_user_errors_fail_fast_with_their_reason(
    service: tinker.ServiceClient, server: Server, tiny_model: str
) -> None:
    from tinker.lib.public_interfaces.training_client import TrainingClient

    ghost_id = "0123456789abcdef:train:9"
    ghost = TrainingClient(
        service.holder,
        9,
        ghost_id,
        info=types.GetInfoResponse(model_id=ghost_id, model_data=types.ModelData()),
    )
    with pytest.raises(tinker.NotFoundError, match="model_id '0123456789abcdef:train:9' is unknown"):
        ghost.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match="cannot be loaded"):
        service.create_lora_training_client(base_model="/no/such/model").result(timeout=60)
    client = service.create_lora_training_client(base_model=tiny_model, rank=2).result(timeout=120)
    datum = _sft_datum(client.get_tokenizer())
    with pytest.raises(tinker.BadRequestError, match="'gspo' is not supported"):  # 400 at submission
        client.forward_backward([datum], "gspo").result(timeout=60)
    shifted_wrong = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [9, 9, 9]}
    )
    with pytest.raises(tinker.RequestFailedError, match="shifted by one"):
        tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key).create_lora_training_client(
            base_model=tiny_model, rank=2
        ).result(timeout=120).forward([shifted_wrong], "cross_entropy").result(timeout=60)
    with pytest.raises(tinker.RequestFailedError, match="checkpoint name '../escape' is not allowed"):
        client.save_state("../escape").result(timeout=60)
    wrong = tinker.ServiceClient(base_url=server.base_url, api_key="tml-wrong-key")
    with pytest.raises(tinker.AuthenticationError, match="X-API-Key"):
        wrong.create_sampling_client(base_model=tiny_model).result(timeout=60)


def test_raw_http_errors_are_json_and_sessions_finish(server: Server) -> None:
    headers = {"X-API-Key": server.api_key}
    with httpx.Client(base_url=server.base_url + "/api/v1", timeout=30) as http:
        assert http.post("/create_session", json={}).status_code == 401
        bad = http.post("/create_session", content=b"{not json", headers=headers)
        assert bad.status_code == 400 and "not JSON" in bad.json()["message"]
        strict = http.post("/create_model", json={"session_id": "x", "surprise": 1}, headers=headers)
        assert strict.status_code == 400 and "CreateModelRequest is malformed" in strict.json()["message"]
        missing = http.post("/retrieve_future", json={"request_id": "req-missing"}, headers=headers)
        assert missing.status_code == 404
        session = http.post(
            "/create_session",
            json={"tags": [], "user_metadata": None, "sdk_version": "0.38.0"},
            headers=headers,
        ).json()["session_id"]
        beat = {"session_id": session, "type": "session_heartbeat"}
        assert http.post("/session_heartbeat", json=beat, headers=headers).json() == {
            "type": "session_heartbeat"
        }
        assert (
            http.post(
                f"/sessions/{session}/finish", json={"reason": {"type": "success"}}, headers=headers
            ).status_code
            == 200
        )
        assert http.post("/session_heartbeat", json=beat, headers=headers).status_code == 410
        telemetry = http.post("/telemetry", json={"events": []}, headers=headers)
        assert telemetry.json() == {"status": "accepted"}

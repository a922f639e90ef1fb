"""Protobuf round trips against the SDK's own converters (what the SDK sends in, what it reads back)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from art_tinker.server.errors import UserError
from art_tinker.server.wire import (
    SampledSequence,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
)


def _request(data: list[types.Datum], **config: float | str) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data, loss_fn="ppo", loss_fn_config=config or None
        ),
        model_id="abc:train:0",
        seq_id=7,
    )
    message = forward_backward_request_to_proto(request)
    message.forward_only = True
    return message.SerializeToString()


def test_forward_backward_request_decodes_tokens_tensors_and_config() -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={
            "target_tokens": [6, 7, 8],
            "logprobs": [0.0, -1.5, -2.5],
            "advantages": torch.tensor([0.0, 0.25, -0.5]),
        },
    )
    call = decode_forward_backward(_request([datum], clip_low_threshold=0.7, tag="x"))
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == ("abc:train:0", 7, "ppo", True)
    assert call.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7), "tag": "x"}
    (decoded,) = call.data
    assert decoded.tokens.tolist() == [5, 6, 7]
    assert decoded.inputs["target_tokens"].dtype == np.int64
    assert decoded.inputs["target_tokens"].tolist() == [6, 7, 8]
    assert decoded.inputs["advantages"].tolist() == pytest.approx([0.0, 0.25, -0.5])


def test_sparse_csr_tensors_are_densified() -> None:
    weights = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    sparse = types.TensorData.from_torch_sparse(weights)
    assert sparse.sparse_crow_indices is not None  # the SDK chose CSR for this tensor
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": sparse},
    )
    (decoded,) = decode_forward_backward(_request([datum])).data
    assert decoded.inputs["weights"].tolist() == weights.tolist()


def test_garbage_body_is_a_user_error() -> None:
    with pytest.raises(UserError, match="not a ForwardBackwardRequest"):
        decode_forward_backward(b"\xff\xff\xff not protobuf")


def test_forward_backward_output_reads_back_through_the_sdk() -> None:
    outputs = [
        {"logprobs": np.array([-1.0, -2.0], dtype=np.float32)},
        {"logprobs": np.array([-3.0], dtype=np.float32)},
    ]
    decoded = deserialize_forward_backward_output(encode_forward_backward_output(outputs, {"loss:sum": 1.5}))
    assert decoded.metrics == {"loss:sum": 1.5}
    assert [o["logprobs"].tolist() for o in decoded.loss_fn_outputs] == [[-1.0, -2.0], [-3.0]]


@pytest.mark.parametrize("key", ["loss", "loss:sum:extra", ":sum"])
def test_metric_keys_must_be_name_colon_reduction(key: str) -> None:
    with pytest.raises(ValueError, match="name:reduction"):
        encode_forward_backward_output([], {key: 1.0})


def test_sample_response_reads_back_through_the_sdk() -> None:
    payload = encode_sample_response(
        [SampledSequence([4, 5], [-0.5, -0.25], "stop"), SampledSequence([6], [-1.0], "length")],
        prompt_logprobs=[math.nan, -2.0],
    )
    decoded = deserialize_sample_response(payload)
    assert [s.tokens for s in decoded.sequences] == [[4, 5], [6]]
    assert [s.stop_reason for s in decoded.sequences] == ["stop", "length"]
    assert decoded.sequences[0].logprobs == pytest.approx([-0.5, -0.25])
    assert decoded.prompt_logprobs is not None and decoded.prompt_logprobs[1] == pytest.approx(-2.0)

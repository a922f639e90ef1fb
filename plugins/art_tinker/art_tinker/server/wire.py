"""Protobuf in and out, with the SDK's own generated module (``tinker.proto.tinker_public_pb2``).

``decode_forward_backward`` reads the SDK's ``ForwardBackwardRequest``; ``encode_forward_backward_output`` and
``encode_sample_response`` write the results the SDK's ``proto.response_conv`` reads back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from tinker.proto import tinker_public_pb2 as pb

from art_tinker.server.errors import UserError

_NUMPY_OF_DTYPE: dict[int, np.dtype[np.generic]] = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_INT64: np.dtype(np.int64),
    pb.DTYPE_INT32: np.dtype(np.int32),
}


@dataclass(frozen=True)
class DatumArrays:
    """One datum: its input tokens ``[N]`` and dense ``loss_fn_inputs`` (per-token tensors are ``[N]``)."""

    tokens: npt.NDArray[np.int64]
    inputs: Mapping[str, npt.NDArray[np.float32] | npt.NDArray[np.int64]]


@dataclass(frozen=True)
class ForwardBackwardCall:
    """A decoded ``/forward_backward`` body."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: Mapping[str, float | str]
    forward_only: bool
    data: Sequence[DatumArrays]


def _tensor_to_numpy(name: str, tensor: pb.Tensor) -> npt.NDArray[np.float32] | npt.NDArray[np.int64]:
    dtype = _NUMPY_OF_DTYPE.get(tensor.dtype)
    if dtype is None:
        raise UserError(
            f"loss_fn_inputs[{name!r}] has proto dtype {tensor.dtype}; send float32 or int64 tensors"
        )
    shape = [int(s) for s in tensor.shape]
    if tensor.WhichOneof("encoding") == "sparse_csr":
        csr = tensor.sparse_csr
        if len(shape) != 2:
            raise UserError(
                f"loss_fn_inputs[{name!r}] is sparse CSR with shape {shape}; CSR needs a 2-D shape"
            )
        values = np.frombuffer(csr.values, dtype=dtype)
        crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
        cols = np.frombuffer(csr.col_indices, dtype=np.int64)
        if len(crow) != shape[0] + 1 or len(cols) != len(values) or (len(cols) and cols.max() >= shape[1]):
            raise UserError(f"loss_fn_inputs[{name!r}] has inconsistent CSR indices for shape {shape}")
        dense = np.zeros(shape, dtype=dtype)
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        dense[rows, cols] = values
        array = dense
    else:
        array = np.frombuffer(tensor.dense, dtype=dtype)
        if shape:
            if int(np.prod(shape)) != array.size:
                raise UserError(f"loss_fn_inputs[{name!r}] has {array.size} values but shape {shape}")
            array = array.reshape(shape)
    if array.dtype == np.int32:
        return array.astype(np.int64)
    return array.astype(np.float32) if array.dtype == np.float32 else array.astype(np.int64)


def _datum_tokens(index: int, datum: pb.Datum) -> npt.NDArray[np.int64]:
    parts = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UserError(
                f"datum {index}: only encoded_text chunks are supported here (got {kind or 'empty'})"
            )
        parts.append(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    """Parse a protobuf ``ForwardBackwardRequest``; malformed input is a ``UserError``."""
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except Exception as error:  # protobuf raises DecodeError and friends
        raise UserError(f"forward_backward body is not a ForwardBackwardRequest protobuf: {error}") from None
    if not message.model_id:
        raise UserError("forward_backward body has no model_id")
    config: dict[str, float | str] = {key: float(value) for key, value in message.loss_fn_config.items()}
    for key, value in message.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    data = [
        DatumArrays(
            tokens=_datum_tokens(index, datum),
            inputs={name: _tensor_to_numpy(name, tensor) for name, tensor in datum.loss_fn_inputs.items()},
        )
        for index, datum in enumerate(message.data)
    ]
    return ForwardBackwardCall(
        model_id=message.model_id,
        seq_id=int(message.seq_id),
        loss_fn=message.loss_fn,
        loss_fn_config=config,
        forward_only=bool(message.forward_only),
        data=data,
    )


def encode_forward_backward_output(
    per_datum: Sequence[Mapping[str, npt.NDArray[np.float32]]], metrics: Mapping[str, float]
) -> bytes:
    """``ForwardBackwardOutput``: one ``ArrayRecord`` holding every datum's float32 fields, plus metrics."""
    for key in metrics:
        name, sep, reduction = key.partition(":")
        if not sep or not name or ":" in reduction:
            raise ValueError(f"metric key {key!r} must look like 'name:reduction' (e.g. 'loss:sum')")
    output = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=dict(metrics))
    if per_datum:
        record = output.loss_fn_outputs.add()
        record.type_tag = "ArrayRecord"
        record.num_datums = len(per_datum)
        for name in per_datum[0]:
            arrays = [np.ascontiguousarray(datum[name], dtype=np.float32).reshape(-1) for datum in per_datum]
            sizes = np.array([0] + [a.nbytes for a in arrays], dtype=np.int64)
            field = record.fields[name]
            field.dtype = pb.DTYPE_FLOAT32
            field.data = b"".join(a.tobytes() for a in arrays)
            field.offsets = np.cumsum(sizes).astype(np.int64).tobytes()
    return bytes(output.SerializeToString())


@dataclass(frozen=True)
class SampledSequence:
    """One sample: its tokens, their logprobs, and why it stopped."""

    tokens: Sequence[int]
    logprobs: Sequence[float]
    stop_reason: str  # "stop" or "length"


def encode_sample_response(
    sequences: Sequence[SampledSequence], prompt_logprobs: Sequence[float] | None = None
) -> bytes:
    """``SampleResponse`` with int32 tokens and float32 logprobs per sequence (NaN = no prompt logprob)."""
    response = pb.SampleResponse()
    for sequence in sequences:
        item = response.sequences.add()
        item.stop_reason = pb.STOP_REASON_LENGTH if sequence.stop_reason == "length" else pb.STOP_REASON_STOP
        item.tokens = np.asarray(sequence.tokens, dtype=np.int32).tobytes()
        item.logprobs = np.asarray(sequence.logprobs, dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        response.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    return bytes(response.SerializeToString())

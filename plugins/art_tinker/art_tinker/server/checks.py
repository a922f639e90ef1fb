"""Checks of request values that are not addressing: LoRA shape, optimizer, training data, sampling options.

They run when a request is submitted, so a bad value is a 400 at once (the SDK raises it from the call) rather
than an ``IndexError`` or a NaN loss from inside the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from tinker import types

from art_tinker.server.engine import ModelLimits, SampleSpec
from art_tinker.server.errors import UserError
from art_tinker.server.store import LoraSpec
from art_tinker.server.wire import DatumArrays

MAX_SAMPLES_PER_REQUEST = 256
# Above this a LoRA adapter costs more than the layers it adapts on any model this server can train.
MAX_LORA_RANK = 512


def lora_spec(lora: types.LoraConfig | None, limits: ModelLimits) -> LoraSpec:
    """The LoRA shape of a ``create_model`` request (this server trains LoRA adapters only)."""
    if lora is None:
        raise UserError("create_model needs a lora_config; this server trains LoRA adapters only")
    highest = min(MAX_LORA_RANK, limits.hidden_size)
    if not 1 <= lora.rank <= highest:
        raise UserError(
            f"lora_config.rank={lora.rank} is outside the allowed range [1, {highest}] for this base model "
            f"(hidden size {limits.hidden_size}); ranks 8 to 64 are usual"
        )
    if not (lora.train_mlp or lora.train_attn or lora.train_unembed):
        raise UserError(f"lora_config {lora!r} needs one of train_mlp/train_attn/train_unembed")
    return LoraSpec(lora.rank, lora.seed, lora.train_mlp, lora.train_attn, lora.train_unembed)


def _check_ids(ids: np.ndarray, where: str, vocab_size: int) -> None:
    outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if outside.size:
        first = int(outside[0])
        raise UserError(
            f"{where}[{first}] is token id {int(ids[first])}, outside this model's vocabulary [0, {vocab_size}) "
            f"({outside.size} such ids); encode with the model's own tokenizer"
        )


def check_data(data: Sequence[DatumArrays], limits: ModelLimits) -> None:
    """Each datum fits the model: ids in its vocabulary, length within its context, finite loss inputs."""
    if not data:
        raise UserError("forward_backward got no data; send at least one Datum")
    for index, datum in enumerate(data):
        # the trainer sees model_input plus the last target token
        if len(datum.tokens) + 1 > limits.context_length:
            raise UserError(
                f"datum {index} has {len(datum.tokens)} input tokens (+1 target), over this model's context of "
                f"{limits.context_length} tokens; truncate or split it"
            )
        _check_ids(datum.tokens, f"datum {index}: model_input", limits.vocab_size)
        for name, values in datum.inputs.items():
            array = np.asarray(values)
            if name == "target_tokens":
                _check_ids(
                    array.reshape(-1), f"datum {index}: loss_fn_inputs['target_tokens']", limits.vocab_size
                )
            elif array.dtype.kind == "f" and not np.isfinite(array).all():
                first = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
                raise UserError(
                    f"datum {index}: loss_fn_inputs[{name!r}][{first}] is {array.reshape(-1)[first]}; "
                    "loss inputs must be finite numbers"
                )


def check_prompt(prompt: Sequence[int], limits: ModelLimits) -> None:
    """A sampling prompt fits the model: ids in its vocabulary, length within its context."""
    if len(prompt) >= limits.context_length:
        raise UserError(
            f"the prompt has {len(prompt)} tokens, which leaves no room in this model's context of "
            f"{limits.context_length} tokens; shorten it"
        )
    _check_ids(np.asarray(prompt, dtype=np.int64), "prompt", limits.vocab_size)


def check_optimizer(config: types.OptimizerConfig | None) -> None:
    """Only AdamW (the SDK's default) is implemented."""
    if config is not None and getattr(config, "type", "adamw") != "adamw":
        raise UserError(f"optimizer {config.type!r} is not supported here; use AdamW (the default)")


def check_sample_request(request: types.SampleRequest) -> None:
    """Refuse sampling options this server does not implement, naming them."""
    if not 1 <= request.num_samples <= MAX_SAMPLES_PER_REQUEST:
        raise UserError(f"num_samples={request.num_samples} must be between 1 and {MAX_SAMPLES_PER_REQUEST}")
    unsupported = {
        "topk_prompt_logprobs": request.topk_prompt_logprobs > 0,
        "topk_sample_logprobs": request.topk_sample_logprobs > 0,
        "target_prompt_logprobs": request.target_prompt_logprobs is not None,
        "prompt_alt_tokens_k": request.prompt_alt_tokens_k > 0,
        "record_stability_info": bool(request.record_stability_info),
    }
    named = [name for name, asked in unsupported.items() if asked]
    if named:
        raise UserError(f"{', '.join(named)} not supported by the art loopback server; leave them unset")


def sample_spec(params: types.SamplingParams, eos_token_ids: tuple[int, ...]) -> SampleSpec:
    """The SDK's ``SamplingParams`` resolved: ``stop=None`` ends at EOS, ``[]`` at nothing, a list at it and EOS."""
    stop = [params.stop] if isinstance(params.stop, str) else params.stop
    stop_tokens: tuple[int, ...] = () if stop is not None and len(stop) == 0 else eos_token_ids
    stop_strings: tuple[str, ...] = ()
    if stop and all(isinstance(s, int) for s in stop):
        stop_tokens = (*stop_tokens, *(int(s) for s in stop))
    elif stop and all(isinstance(s, str) for s in stop):
        stop_strings = tuple(str(s) for s in stop)
    elif stop:
        raise UserError(f"sampling_params.stop {stop!r} mixes strings and token ids; use one kind")
    if params.max_tokens is not None and params.max_tokens < 1:
        raise UserError(f"sampling_params.max_tokens={params.max_tokens} must be >= 1")
    if not (math.isfinite(params.temperature) and params.temperature >= 0) or not 0 < params.top_p <= 1:
        raise UserError(f"temperature={params.temperature} must be >= 0 and top_p={params.top_p} in (0, 1]")
    return SampleSpec(
        max_tokens=params.max_tokens or 0,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        stop_tokens=stop_tokens,
        stop_strings=stop_strings,
    )

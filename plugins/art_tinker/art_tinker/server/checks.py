"""Checks of request values that are not addressing: LoRA shape, optimizer, sampling options."""

from __future__ import annotations

from tinker import types

from art_tinker.server.engine import SampleSpec
from art_tinker.server.errors import UserError
from art_tinker.server.store import LoraSpec

MAX_SAMPLES_PER_REQUEST = 256


def lora_spec(lora: types.LoraConfig | None) -> LoraSpec:
    """The LoRA shape of a ``create_model`` request (this server trains LoRA adapters only)."""
    if lora is None:
        raise UserError("create_model needs a lora_config; this server trains LoRA adapters only")
    if lora.rank < 1 or not (lora.train_mlp or lora.train_attn or lora.train_unembed):
        raise UserError(f"lora_config {lora!r} needs rank >= 1 and one of train_mlp/train_attn/train_unembed")
    return LoraSpec(lora.rank, lora.seed, lora.train_mlp, lora.train_attn, lora.train_unembed)


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
    if params.temperature < 0 or not 0 < params.top_p <= 1:
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

"""The loopback server's sampler: a KV-cache loop over ``num_samples`` copies of one prompt.

Logprobs are those of the untempered distribution (``log_softmax(logits)`` in fp32), the quantity the trainer
recomputes, whatever ``temperature``/``top_k``/``top_p`` shaped the draw. A sample ends at a stop token (which is
kept, as Tinker returns it), when its decoded text contains a stop string, or after ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from art_tinker.server.engine import SampleSpec
from art_tinker.server.wire import SampledSequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def next_tokens_B(
    logits_BV: torch.Tensor, spec: SampleSpec, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw per row from the tempered, top-k and top-p filtered distribution (argmax at temperature 0)."""
    if spec.temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    scaled_BV = logits_BV.float() / spec.temperature
    if spec.top_k > 0:
        kth_B1 = scaled_BV.topk(min(spec.top_k, scaled_BV.shape[-1]), dim=-1).values[:, -1:]
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(scaled_BV, dim=-1)
    if spec.top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        drop_sorted_BV = (sorted_BV.cumsum(dim=-1) - sorted_BV) >= spec.top_p  # never drops the first token
        probs_BV = probs_BV.masked_fill(
            torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV), 0.0
        )
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _stopped_by_string(tokenizer: Any, tokens: list[int], stop_strings: Sequence[str]) -> bool:
    if not stop_strings:
        return False
    window = 4 * max(len(s) for s in stop_strings) + 4
    tail = tokenizer.decode(tokens[-window:], skip_special_tokens=True)
    return any(s in tail for s in stop_strings)


@torch.inference_mode()
def sample(
    model: PreTrainedModel,
    tokenizer: Any,
    prompt: Sequence[int],
    num_samples: int,
    spec: SampleSpec,
    max_new_tokens: int,
) -> list[SampledSequence]:
    """``num_samples`` completions of ``prompt`` sharing one KV cache."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    generator = None if spec.seed is None else torch.Generator(device=device).manual_seed(spec.seed)
    tokens_BP = torch.tensor([list(prompt)] * num_samples, dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    logits_BV = model(input_ids=tokens_BP, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[
        :, -1, :
    ]
    stop_tokens = set(spec.stop_tokens)
    outputs: list[list[int]] = [[] for _ in range(num_samples)]
    logprobs: list[list[float]] = [[] for _ in range(num_samples)]
    reasons: list[str | None] = [None] * num_samples
    for _ in range(max_new_tokens):
        chosen_B = next_tokens_B(logits_BV, spec, generator)
        chosen_logprobs_B = logits_BV.float().log_softmax(dim=-1).gather(-1, chosen_B[:, None]).squeeze(-1)
        for row, (token, logprob) in enumerate(
            zip(chosen_B.tolist(), chosen_logprobs_B.tolist(), strict=True)
        ):
            if reasons[row] is not None:
                continue
            outputs[row].append(token)
            logprobs[row].append(logprob)
            if token in stop_tokens or _stopped_by_string(tokenizer, outputs[row], spec.stop_strings):
                reasons[row] = "stop"
        if all(reason is not None for reason in reasons):
            break
        logits_BV = model(input_ids=chosen_B[:, None], past_key_values=cache, use_cache=True).logits[:, -1, :]
    return [
        SampledSequence(tokens, values, reason or "length")
        for tokens, values, reason in zip(outputs, logprobs, reasons, strict=True)
    ]


@torch.inference_mode()
def prompt_logprobs(model: PreTrainedModel, prompt: Sequence[int]) -> list[float]:
    """Each prompt token's logprob given the tokens before it (NaN for the first)."""
    device = next(model.parameters()).device
    tokens_1T = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    logprobs_TV = model(input_ids=tokens_1T).logits[0].float().log_softmax(dim=-1)
    chosen_T = logprobs_TV[:-1].gather(-1, tokens_1T[0, 1:, None]).squeeze(-1)
    return [float("nan"), *chosen_T.cpu().tolist()]

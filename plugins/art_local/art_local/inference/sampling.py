"""A bare KV-cache sampling loop over a batch of left-padded prompts (transformers causal LMs).

One forward over the padded prompts fills the cache; then one token per row per step. Each row keeps its own
temperature, top_p, max_tokens, stop strings and random generator; finished rows leave the batch (their cache
rows are dropped), so a long completion does not make short ones pay. Logprobs are those of the untempered
distribution, ``log_softmax(logits)`` in fp32 (see ``engine.py``).

On a tiny model most of the time is per-token dispatch overhead, which is why this loop, and not
``model.generate()``, is used (ARCHITECTURE §6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from art_local.inference.engine import Completion, FinishReason, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Row:
    """One sequence to sample: a prompt, its options and (when seeded) its own random generator."""

    prompt: tuple[int, ...]
    params: SamplingParams
    generator: torch.Generator | None
    max_new_tokens: int  # params.max_tokens, capped by the context length


@dataclass
class _RowOutput:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_at: int | None = None  # character offset of a matched stop string in the decoded text


@dataclass(frozen=True)
class Vocab:
    """The tokenizer facts the loop needs: which ids end a turn, and how to decode for stop strings."""

    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]
    pad_token_id: int


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``tokens_BP`` and ``attention_mask_BP`` (1 on real tokens)."""
    length = max(len(p) for p in prompts)
    tokens_BP = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask_BP = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        tokens_BP[i, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask_BP[i, length - len(prompt) :] = 1
    return tokens_BP.to(device), mask_BP.to(device)


def sample_tokens(
    logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p_B: torch.Tensor, noise_BV: torch.Tensor | None
) -> torch.Tensor:
    """Next token per row: argmax where temperature is 0, else a draw from the tempered, top-p-filtered softmax.

    ``noise_BV`` holds Exp(1) draws; ``argmax(p / noise)`` is an exact sample from ``p`` (the exponential race),
    which lets each row draw from its own generator.
    """
    greedy_B = logits_BV.argmax(dim=-1)
    if noise_BV is None:
        return greedy_B
    scaled_BV = logits_BV.float() / temperature_B.clamp(min=1e-5).unsqueeze(-1)
    probs_BV = torch.softmax(scaled_BV, dim=-1)
    if bool((top_p_B < 1.0).any()):
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass strictly before each token
        drop_sorted_BV = before_BV >= top_p_B.unsqueeze(-1)  # the first token is never dropped
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        probs_BV = probs_BV.masked_fill(drop_BV, 0.0)
    sampled_B = (probs_BV / noise_BV).argmax(dim=-1)
    return torch.where(temperature_B == 0.0, greedy_B, sampled_B)


def _noise(rows: Sequence[Row], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    if all(row.params.temperature == 0.0 for row in rows):
        return None
    noise_BV = torch.empty((len(rows), vocab_size), device=device).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None and row.params.temperature > 0.0:
            noise_BV[i].exponential_(generator=row.generator)
    return noise_BV


def decode(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> str:
    """Text of ``token_ids`` without special tokens."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    assert isinstance(text, str)
    return text


def _stop_offset(vocab: Vocab, output: _RowOutput, stop: tuple[str, ...]) -> int | None:
    """Character offset in the decoded completion where the first stop string starts, if one appeared."""
    if not stop:
        return None
    window = 4 * max(len(s) for s in stop) + 4  # each token is at least one byte, a char at most four
    tail = decode(vocab.tokenizer, output.token_ids[-window:])
    if not any(s in tail for s in stop):
        return None
    text = decode(vocab.tokenizer, output.token_ids)
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _record(
    vocab: Vocab, row: Row, output: _RowOutput, token: int, logprob: float, top: tuple[tuple[int, float], ...]
) -> None:
    output.token_ids.append(token)
    output.logprobs.append(logprob)
    if row.params.top_logprobs:
        output.top_logprobs.append(top[: row.params.top_logprobs])
    if token in vocab.eos_token_ids and not row.params.ignore_eos:
        output.finish_reason = "stop"
    elif (offset := _stop_offset(vocab, output, row.params.stop)) is not None:
        output.finish_reason, output.stop_at = "stop", offset
    elif len(output.token_ids) >= row.max_new_tokens:
        output.finish_reason = "length"


def _completion(vocab: Vocab, output: _RowOutput) -> Completion:
    ids = output.token_ids
    body = ids[:-1] if ids and ids[-1] in vocab.eos_token_ids and output.stop_at is None else ids
    text = decode(vocab.tokenizer, body)
    assert output.finish_reason is not None
    return Completion(
        token_ids=tuple(ids),
        logprobs=tuple(output.logprobs),
        top_logprobs=tuple(output.top_logprobs),
        text=text if output.stop_at is None else text[: output.stop_at],
        finish_reason=output.finish_reason,
    )


@torch.inference_mode()
def sample_rows(model: PreTrainedModel, vocab: Vocab, rows: Sequence[Row]) -> list[Completion]:
    """Sample every row to completion with one shared KV cache; one ``Completion`` per row, in order."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    tokens_BP, mask_BT = left_pad([row.prompt for row in rows], vocab.pad_token_id, device)
    positions_B = mask_BT.sum(dim=-1) - 1
    cache = DynamicCache(config=model.config)
    logits_BV = model(
        input_ids=tokens_BP,
        attention_mask=mask_BT,
        position_ids=(mask_BT.cumsum(dim=-1) - 1).clamp(min=0),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1, :]
    outputs = [_RowOutput() for _ in rows]
    active = list(range(len(rows)))  # row index of each batch position
    temperature_B = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32, device=device)
    top_p_B = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=device)
    max_top = max(r.params.top_logprobs for r in rows)
    while True:
        batch_rows = [rows[i] for i in active]
        logprobs_BV = logits_BV.float().log_softmax(dim=-1)
        tokens_B = sample_tokens(
            logits_BV, temperature_B, top_p_B, _noise(batch_rows, logits_BV.shape[-1], device)
        )
        chosen_B = logprobs_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1)
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(active)
        if max_top:
            values_BK, ids_BK = logprobs_BV.topk(max_top, dim=-1)
            tops = [
                tuple(zip(i, v, strict=True))
                for i, v in zip(ids_BK.tolist(), values_BK.tolist(), strict=True)
            ]
        for pos, (token, logprob) in enumerate(zip(tokens_B.tolist(), chosen_B.tolist(), strict=True)):
            _record(vocab, rows[active[pos]], outputs[active[pos]], token, logprob, tops[pos])
        keep = [pos for pos, i in enumerate(active) if outputs[i].finish_reason is None]
        if not keep:
            break
        if len(keep) < len(active):
            keep_K = torch.tensor(keep, device=device)
            cache.batch_select_indices(keep_K)
            mask_BT, positions_B, tokens_B = mask_BT[keep_K], positions_B[keep_K], tokens_B[keep_K]
            temperature_B, top_p_B = temperature_B[keep_K], top_p_B[keep_K]
            active = [active[pos] for pos in keep]
        mask_BT = torch.cat([mask_BT, mask_BT.new_ones((len(active), 1))], dim=-1)
        positions_B = positions_B + 1
        logits_BV = model(
            input_ids=tokens_B.unsqueeze(-1),
            attention_mask=mask_BT,
            position_ids=positions_B.unsqueeze(-1),
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1, :]
    return [_completion(vocab, output) for output in outputs]

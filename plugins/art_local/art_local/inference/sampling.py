"""A bare KV-cache sampling loop over a batch of left-padded prompts (transformers causal LMs).

One forward over the padded prompts fills the cache; then one token per row per step. Each row keeps its own
temperature, top_p, max_tokens, stop strings and random generator; finished rows leave the batch (their cache
rows are dropped), so a long completion does not make short ones pay. Logprobs are those of the untempered
distribution, ``log_softmax(logits)`` in fp32 (see ``engine.py``).

On a tiny model most of the time is per-token dispatch overhead, which is why this loop, and not
``model.generate()``, is used (docs/architecture.md §6). For Llama-style decoder stacks (Llama, Mistral, Qwen2) the
one-token decoding forward is ``DecodeStep``: transformers' formulas on the model's own weights and norm and
rotary modules (a test holds its logits and cache to transformers' within 1e-5), without the per-module
dispatch, mask building and output plumbing (measured on the 18M model, 8 rows, 1 thread: 17-19 ms per step through transformers, 15-16 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from art_local.inference.engine import Completion, FinishReason, SamplingParams
from art_local.inference.fast_decode import DecodeStep

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase


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
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    top_p_B: torch.Tensor,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row: argmax where temperature is 0, else a draw from the tempered, top-p-filtered softmax.

    Rows with a generator (a request ``seed``) draw from it alone, so their samples do not depend on what else
    is in the batch; the others share one draw from torch's default generator.
    """
    greedy_B = logits_BV.argmax(dim=-1)
    sampling_B = temperature_B > 0.0
    if not bool(sampling_B.any()):
        return greedy_B
    scaled_BV = logits_BV.float() / temperature_B.clamp(min=1e-5).unsqueeze(-1)
    probs_BV = torch.softmax(scaled_BV, dim=-1)
    if bool((top_p_B < 1.0).any()):
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass strictly before each token
        drop_sorted_BV = before_BV >= top_p_B.unsqueeze(-1)  # the first token is never dropped
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        probs_BV = probs_BV.masked_fill(drop_BV, 0.0)
    sampled_B = greedy_B.clone()
    flags = sampling_B.tolist()
    shared = [i for i, g in enumerate(generators) if g is None and flags[i]]
    if shared:
        rows_S = torch.tensor(shared, device=logits_BV.device)
        sampled_B[rows_S] = torch.multinomial(probs_BV[rows_S], 1).squeeze(-1)
    for i, generator in enumerate(generators):
        if generator is not None and flags[i]:
            sampled_B[i] = torch.multinomial(probs_BV[i], 1, generator=generator)[0]
    return sampled_B


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


def _cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = cast(list[Any], cache.layers)  # DynamicLayer: keys/values are [B, heads, T, head_dim]
    return [(layer.keys, layer.values) for layer in layers]


def _left_pad_kv(kv: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - kv.shape[-2]
    if missing == 0:
        return kv
    return torch.cat([kv.new_zeros((*kv.shape[:-2], missing, kv.shape[-1])), kv], dim=-2)


def _left_pad_mask(mask_BT: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask_BT.shape[-1]
    return (
        mask_BT
        if missing == 0
        else torch.cat([mask_BT.new_zeros((mask_BT.shape[0], missing)), mask_BT], dim=-1)
    )


def mergeable(cache: DynamicCache) -> bool:
    """True when every cache layer is a plain full-attention ``DynamicLayer`` (rows can join and leave)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


class DecodeBatch:
    """The running batch of one model: rows join (``admit``) and leave (when finished) between steps.

    Rows are left-aligned against one KV cache; a joining group is prefilled on its own and its cache is
    left-padded (masked) to the batch's length, so every row keeps its own positions. Columns that are padding
    for every remaining row are cut off, so the cache never grows past the longest live row.
    """

    def __init__(self, model: PreTrainedModel, vocab: Vocab) -> None:
        self.model, self.vocab = model, vocab
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.outputs: list[_RowOutput] = []
        self.tickets: list[object] = []  # who each row belongs to (opaque to this class)
        self.cache: DynamicCache | None = None
        self.mask_BT = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.positions_B = torch.zeros((0,), dtype=torch.long, device=self.device)
        self.logits_BV: torch.Tensor | None = None  # next-token logits of every row, waiting to be sampled
        self.joinable = True  # False for caches this class cannot merge (sliding windows, ...)
        self.lean = DecodeStep.of(model)  # None: decode through the model's own forward

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def admit(self, rows: Sequence[Row], tickets: Sequence[object]) -> None:
        """Prefill ``rows`` and add them to the batch."""
        from transformers import DynamicCache

        assert self.joinable or not self.rows, "this cache cannot take rows while others run"
        cache = DynamicCache(config=self.model.config)
        # a GRPO group's rows share their prompt: prefill each distinct prompt once, then copy its cache rows
        distinct: dict[tuple[int, ...], int] = {}
        order = [distinct.setdefault(row.prompt, len(distinct)) for row in rows]
        prompts = list(distinct) if mergeable(cache) else [row.prompt for row in rows]
        tokens_UP, mask_UP = left_pad(prompts, self.vocab.pad_token_id, self.device)
        logits_UV = self.model(
            input_ids=tokens_UP,
            attention_mask=mask_UP,
            position_ids=(mask_UP.cumsum(dim=-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        if len(prompts) < len(rows):
            order_B = torch.tensor(order, dtype=torch.long, device=self.device)
            cache.batch_select_indices(order_B)
            mask_BP, logits_BV = mask_UP[order_B], logits_UV[order_B]
        else:
            mask_BP, logits_BV = mask_UP, logits_UV
        positions_B = mask_BP.sum(dim=-1) - 1
        if self.cache is None or not self.rows:
            self.cache, self.mask_BT, self.positions_B, self.logits_BV = (
                cache,
                mask_BP,
                positions_B,
                logits_BV,
            )
            self.joinable = mergeable(cache)
        else:
            assert self.logits_BV is not None
            length = max(self.mask_BT.shape[-1], mask_BP.shape[-1])
            merged = [
                (torch.cat([_left_pad_kv(k0, length), _left_pad_kv(k1, length)]),
                 torch.cat([_left_pad_kv(v0, length), _left_pad_kv(v1, length)]))
                for (k0, v0), (k1, v1) in zip(_cache_tensors(self.cache), _cache_tensors(cache), strict=True)
            ]  # fmt: skip
            self.cache = DynamicCache(ddp_cache_data=merged, config=self.model.config)
            self.mask_BT = torch.cat([_left_pad_mask(self.mask_BT, length), _left_pad_mask(mask_BP, length)])
            self.positions_B = torch.cat([self.positions_B, positions_B])
            self.logits_BV = torch.cat([self.logits_BV, logits_BV])
        self.rows += rows
        self.outputs += [_RowOutput() for _ in rows]
        self.tickets += tickets

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows at indices ``keep`` (in order), e.g. to drop those nobody waits for any more."""
        if not keep:
            self.rows, self.outputs, self.tickets = [], [], []
            self.cache, self.logits_BV = None, None
            return
        if self.logits_BV is not None:
            self.logits_BV = self.logits_BV[torch.tensor(keep, device=self.device, dtype=torch.long)]
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        assert self.cache is not None
        keep_K = torch.tensor(keep, device=self.device, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.outputs = [self.outputs[i] for i in keep]
        self.tickets = [self.tickets[i] for i in keep]
        self.mask_BT, self.positions_B = self.mask_BT[keep_K], self.positions_B[keep_K]
        live_T = self.mask_BT.sum(dim=0) > 0
        first = int(live_T.nonzero()[0]) if bool(live_T.any()) else 0
        if first > 0 and self.joinable:  # columns that are padding for every remaining row
            self.mask_BT = self.mask_BT[:, first:]
            trimmed = [(k[keep_K, :, first:], v[keep_K, :, first:]) for k, v in _cache_tensors(self.cache)]
            self.cache = type(self.cache)(ddp_cache_data=trimmed, config=self.model.config)
        else:
            self.cache.batch_select_indices(keep_K)

    @torch.inference_mode()
    def step(self) -> list[tuple[object, Completion]]:
        """Sample one token for every row, retire finished rows, and run the forward for the rest."""
        assert self.logits_BV is not None and self.cache is not None and self.rows
        logits_BV = self.logits_BV
        temperature_B = torch.tensor([r.params.temperature for r in self.rows], device=self.device)
        top_p_B = torch.tensor([r.params.top_p for r in self.rows], device=self.device)
        logprobs_BV = logits_BV.float().log_softmax(dim=-1)
        tokens_B = sample_tokens(logits_BV, temperature_B, top_p_B, [row.generator for row in self.rows])
        chosen_B = logprobs_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1)
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(self.rows)
        if max_top := max(r.params.top_logprobs for r in self.rows):
            values_BK, ids_BK = logprobs_BV.topk(max_top, dim=-1)
            tops = [
                tuple(zip(i, v, strict=True))
                for i, v in zip(ids_BK.tolist(), values_BK.tolist(), strict=True)
            ]
        for i, (token, logprob) in enumerate(zip(tokens_B.tolist(), chosen_B.tolist(), strict=True)):
            _record(self.vocab, self.rows[i], self.outputs[i], token, logprob, tops[i])
        done = [
            (self.tickets[i], _completion(self.vocab, o))
            for i, o in enumerate(self.outputs)
            if o.finish_reason
        ]
        keep = [i for i, o in enumerate(self.outputs) if o.finish_reason is None]
        if not keep:
            self.rows, self.outputs, self.tickets = [], [], []
            self.cache, self.logits_BV = None, None
            return done
        if len(keep) < len(self.rows):
            tokens_B = tokens_B[torch.tensor(keep, device=self.device, dtype=torch.long)]
            self._keep(keep)
        self.mask_BT = torch.cat([self.mask_BT, self.mask_BT.new_ones((len(self.rows), 1))], dim=-1)
        self.positions_B = self.positions_B + 1
        if self.lean is not None and self.joinable:
            self.logits_BV = self.lean(tokens_B, self.mask_BT, self.positions_B, self.cache)
            return done
        self.logits_BV = self.model(
            input_ids=tokens_B.unsqueeze(-1),
            attention_mask=self.mask_BT,
            position_ids=self.positions_B.unsqueeze(-1),
            past_key_values=self.cache,
            use_cache=True,
        ).logits[:, -1, :]
        return done


def sample_rows(model: PreTrainedModel, vocab: Vocab, rows: Sequence[Row]) -> list[Completion]:
    """Sample every row to completion in one batch; one ``Completion`` per row, in order."""
    batch = DecodeBatch(model, vocab)
    batch.admit(rows, list(range(len(rows))))
    results: dict[int, Completion] = {}
    while len(batch):
        results.update((cast(int, ticket), completion) for ticket, completion in batch.step())
    return [results[i] for i in range(len(rows))]

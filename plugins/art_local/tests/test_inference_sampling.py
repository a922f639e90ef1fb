"""The KV-cache sampling loop: exact ids and logprobs, left padding, rows joining and leaving, every option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from art_local.inference.engine import SamplingParams
from art_local.inference.fast_decode import DecodeStep
from art_local.inference.sampling import DecodeBatch, Row, Vocab, decode, sample_rows
from art_local.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny() -> Path:
    return build_tiny_model("tiny")


@pytest.fixture(scope="module")
def model(tiny: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vocab(tiny: Path) -> Vocab:
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    return Vocab(tokenizer, frozenset({tokenizer.eos_token_id}), tokenizer.pad_token_id)


def prompt(vocab: Vocab, text: str) -> tuple[int, ...]:
    rendered = vocab.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tuple(vocab.tokenizer.encode(rendered, add_special_tokens=False))


def row(ids: tuple[int, ...], generator: torch.Generator | None = None, **options: Any) -> Row:
    params = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, "ignore_eos": True, **options})
    return Row(ids, params, generator, params.max_tokens)


def full_logprobs(model: Any, ids: tuple[int, ...], completion: tuple[int, ...]) -> torch.Tensor:
    """log π(completion_t | prefix) from one plain forward over prompt + completion."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids) + list(completion)])).logits[0].float()
    picked = logits.log_softmax(-1)[len(ids) - 1 : -1]
    return picked.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def test_greedy_batch_of_different_lengths_matches_generate_and_full_forward(
    model: Any, vocab: Vocab
) -> None:
    prompts = [prompt(vocab, t) for t in ("hi", "Sort these letters: c a b", "What is 12 + 30? " * 3)]
    completions = sample_rows(model, vocab, [row(p) for p in prompts])
    for ids, completion in zip(prompts, completions, strict=True):
        reference = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :]
        assert completion.token_ids == tuple(reference.tolist())
        assert completion.finish_reason == "length" and len(completion.logprobs) == 12
        expected = full_logprobs(model, ids, completion.token_ids)
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-5)


def test_logprobs_are_untempered_and_top_logprobs_rank_the_same_distribution(
    model: Any, vocab: Vocab
) -> None:
    ids = prompt(vocab, "hello")
    generator = torch.Generator().manual_seed(3)
    (completion,) = sample_rows(
        model, vocab, [row(ids, generator, temperature=0.4, top_p=0.9, top_logprobs=5)]
    )
    expected = full_logprobs(model, ids, completion.token_ids)
    assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-5)  # temperature 1, not 0.4
    for top, chosen in zip(completion.top_logprobs, completion.logprobs, strict=True):
        values = [lp for _, lp in top]
        assert len(top) == 5 and values == sorted(values, reverse=True)
        assert values[0] >= chosen - 1e-6


def test_rows_joining_a_running_batch_get_exactly_their_solo_results(model: Any, vocab: Vocab) -> None:
    first = [prompt(vocab, "a short one"), prompt(vocab, "What is 1 + 2? " * 4)]
    late = [prompt(vocab, "What is 40 + 2? " * 6), prompt(vocab, "x")]
    solo = {ids: sample_rows(model, vocab, [row(ids, max_tokens=10)])[0] for ids in first + late}
    batch = DecodeBatch(model, vocab)
    batch.admit([row(ids, max_tokens=10) for ids in first], first)
    results = {}
    for _ in range(4):
        results.update(batch.step())
    batch.admit([row(ids, max_tokens=10) for ids in late], late)  # longer prompt than the running cache
    while len(batch):
        results.update(batch.step())
    for ids, completion in solo.items():
        assert results[ids].token_ids == completion.token_ids
        assert torch.allclose(
            torch.tensor(results[ids].logprobs), torch.tensor(completion.logprobs), atol=1e-5
        )


def test_rows_sharing_a_prompt_are_prefilled_once_and_sample_as_if_alone(model: Any, vocab: Vocab) -> None:
    shared, other = prompt(vocab, "What is 3 + 4?"), prompt(vocab, "Sort these letters: q p r")

    def seeded(ids: tuple[int, ...], seed: int) -> Row:
        return row(ids, torch.Generator().manual_seed(seed), temperature=1.0, max_tokens=10)

    prefill_rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: (
            prefill_rows.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[-1] > 1 else None
        ),
        with_kwargs=True,
    )
    try:
        group = sample_rows(model, vocab, [seeded(shared, s) for s in (1, 2, 3)] + [seeded(other, 4)])
    finally:
        hook.remove()
    assert prefill_rows == [2]  # the two distinct prompts, not four rows
    for seed, ids, completion in zip((1, 2, 3, 4), [shared] * 3 + [other], group, strict=True):
        alone = sample_rows(model, vocab, [seeded(ids, seed)])[0]
        assert completion.token_ids == alone.token_ids
        assert torch.allclose(torch.tensor(completion.logprobs), torch.tensor(alone.logprobs), atol=1e-5)
    assert len({c.token_ids for c in group[:3]}) == 3  # same prompt, own seeds: own samples


def test_finished_rows_leave_and_padding_columns_are_trimmed(model: Any, vocab: Vocab) -> None:
    long_prompt, short_prompt = prompt(vocab, "What is 7 + 8? " * 8), prompt(vocab, "hi")
    batch = DecodeBatch(model, vocab)
    batch.admit([row(long_prompt, max_tokens=2), row(short_prompt, max_tokens=9)], ["long", "short"])
    width_before = batch.mask_BT.shape[-1]
    results = dict(batch.step())
    results.update(batch.step())  # the long row finishes here and leaves
    assert len(batch) == 1 and batch.mask_BT.shape[-1] < width_before  # its padding went with it
    assert batch.mask_BT.shape[-1] == len(short_prompt) + 2
    while len(batch):
        results.update(batch.step())
    assert len(results["long"].token_ids) == 2 and len(results["short"].token_ids) == 9
    assert (
        results["short"].token_ids
        == sample_rows(model, vocab, [row(short_prompt, max_tokens=9)])[0].token_ids
    )


def test_seed_reproduces_a_sample_alone_or_in_company_and_seeds_differ(model: Any, vocab: Vocab) -> None:
    ids = prompt(vocab, "hello")

    def seeded(seed: int) -> Row:
        return row(ids, torch.Generator().manual_seed(seed), temperature=1.0, max_tokens=16)

    alone = sample_rows(model, vocab, [seeded(7)])[0]
    crowded = sample_rows(model, vocab, [row(prompt(vocab, "other")), seeded(7), seeded(8)])
    assert crowded[1].token_ids == alone.token_ids
    assert crowded[2].token_ids != alone.token_ids


def test_tiny_top_p_is_greedy(model: Any, vocab: Vocab) -> None:
    ids = prompt(vocab, "Sort these letters: e d f")
    greedy = sample_rows(model, vocab, [row(ids)])[0]
    nucleus = sample_rows(
        model, vocab, [row(ids, torch.Generator().manual_seed(1), temperature=1.0, top_p=1e-6)]
    )[0]
    assert nucleus.token_ids == greedy.token_ids


def test_stop_string_cuts_the_text_and_ends_the_completion(model: Any, vocab: Vocab) -> None:
    ids = prompt(vocab, "What is 3 + 4?")
    free = sample_rows(model, vocab, [row(ids, max_tokens=24)])[0]
    pieces = [decode(vocab.tokenizer, [t]) for t in free.token_ids]
    k = next(i for i, p in enumerate(pieces) if i >= 3 and p.strip().isalnum())
    stop = pieces[k].strip()
    stopped = sample_rows(model, vocab, [row(ids, max_tokens=24, stop=(stop,))])[0]
    assert stopped.finish_reason == "stop"
    assert (
        free.token_ids[: len(stopped.token_ids)] == stopped.token_ids
    )  # the exact sampled ids, cut at the stop
    full_text = decode(vocab.tokenizer, free.token_ids)
    assert stopped.text == full_text[: full_text.index(stop)]
    assert stop in decode(vocab.tokenizer, stopped.token_ids)


def test_eos_ends_with_stop_keeps_the_eos_id_and_drops_it_from_the_text(model: Any, vocab: Vocab) -> None:
    ids = prompt(vocab, "hello")
    free = sample_rows(model, vocab, [row(ids, max_tokens=8)])[0]
    eos = free.token_ids[4]  # pretend the 5th greedy token ends the turn
    ending = Vocab(vocab.tokenizer, frozenset({eos}), vocab.pad_token_id)
    first = free.token_ids.index(eos)
    stopped = sample_rows(model, ending, [row(ids, max_tokens=8, ignore_eos=False)])[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.text == decode(vocab.tokenizer, free.token_ids[:first])
    ignoring = sample_rows(model, ending, [row(ids, max_tokens=8, ignore_eos=True)])[0]
    assert ignoring.token_ids == free.token_ids and ignoring.finish_reason == "length"


def test_lean_decode_step_equals_the_model_forward_exactly_on_a_padded_batch(
    model: Any, vocab: Vocab
) -> None:
    """``DecodeStep`` (the decoding loop's fast path) gives transformers' own logits and cache.

    Not bit for bit: transformers runs grouped-query attention by repeating the key/value heads, we let SDPA
    group them (measured difference 1e-7 on this model).
    """
    from transformers import DynamicCache

    lean = DecodeStep.of(model)
    assert lean is not None  # the tiny model is a Llama: the fast path is the one the server uses
    prompts = [prompt(vocab, t) for t in ("hi", "Sort these letters: c a b", "What is 12 + 30? " * 3)]
    batch = DecodeBatch(model, vocab)
    batch.admit([row(p) for p in prompts], [0, 1, 2])
    assert batch.cache is not None and batch.lean is not None
    copies = [
        DynamicCache(
            ddp_cache_data=[(layer.keys.clone(), layer.values.clone()) for layer in batch.cache.layers],
            config=model.config,
        )
        for _ in range(2)
    ]
    tokens_B = torch.tensor([5, 17, 40])
    mask_BT = torch.cat([batch.mask_BT, batch.mask_BT.new_ones((3, 1))], dim=-1)
    positions_B = batch.positions_B + 1
    with torch.inference_mode():
        expected = model(
            input_ids=tokens_B.unsqueeze(-1),
            attention_mask=mask_BT,
            position_ids=positions_B.unsqueeze(-1),
            past_key_values=copies[0],
            use_cache=True,
        ).logits[:, -1, :]
        got = lean(tokens_B, mask_BT, positions_B, copies[1])
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    for ours, theirs in zip(copies[1].layers, copies[0].layers, strict=True):
        assert ours.keys.shape == theirs.keys.shape and ours.values.shape == theirs.values.shape
        assert torch.allclose(ours.keys, theirs.keys, rtol=0, atol=1e-5)
        assert torch.allclose(ours.values, theirs.values, rtol=0, atol=1e-5)


def test_packed_decode_matmuls_follow_weights_changed_in_place(
    model: Any, vocab: Vocab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The oneDNN packs of the decoding step's weights equal ``F.linear`` and are redone after a publish
    copies new weights into the module (what the server does every training step)."""
    import copy

    from art_local.inference.fast_decode import PackedLinears

    if not PackedLinears.available():
        pytest.skip("this torch has no oneDNN")
    served = copy.deepcopy(model)
    lean = DecodeStep.of(served)
    assert lean is not None and lean.packed is None  # the tiny model's matrices are too small to gain
    monkeypatch.setattr(PackedLinears, "min_elements", 0)  # pack them all, to test the packs
    prompts = [prompt(vocab, t) for t in ("hi", "Sort these letters: c a b")]
    rows = [row(p, max_tokens=6) for p in prompts]

    def plain_then_packed() -> tuple[list[Any], list[Any]]:
        lean = DecodeStep.of(served)
        assert lean is not None and lean.packed is not None
        packed = sample_rows(served, vocab, rows)
        lean.packed = None
        saved, DecodeStep.of = DecodeStep.of, staticmethod(lambda _: lean)  # type: ignore[method-assign]
        try:
            plain = sample_rows(served, vocab, rows)
        finally:
            DecodeStep.of = saved  # type: ignore[method-assign]
        return plain, packed

    runs = []
    for _ in range(2):
        plain, packed = plain_then_packed()
        for a, b in zip(plain, packed, strict=True):
            assert a.token_ids == b.token_ids
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
        runs.append(packed)
        with torch.no_grad():  # a publish: new values copied into the same tensors
            for parameter in served.parameters():
                parameter.copy_(parameter * 1.5)
    assert runs[0][0].logprobs != runs[1][0].logprobs  # the packs followed the new weights


def test_packs_are_never_taken_for_another_object_that_got_a_freed_one_s_id(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ids are reused once an object is freed: a new module or weight must not inherit old packs."""
    import copy
    import weakref

    from art_local.inference.fast_decode import PackedLinears

    if not PackedLinears.available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(PackedLinears, "min_elements", 0)
    old, new = copy.deepcopy(model), copy.deepcopy(model)
    old_packs = PackedLinears.for_module(old)
    assert old_packs is not None
    with PackedLinears._lock:  # as if ``old`` had been freed and ``new`` allocated at its address
        PackedLinears._by_module[id(new)] = (weakref.ref(old), old_packs)
    assert PackedLinears.for_module(new) is not old_packs

    big, small = old.lm_head, old.model.layers[0].self_attn.k_proj
    old_packs.refresh([big])
    old_packs._packs[id(small.weight)] = old_packs._packs[id(big.weight)]  # stale, under the small one's id
    x = torch.randn(2, 1, small.weight.shape[1])
    with torch.inference_mode():
        assert torch.equal(old_packs(x, small), small(x))


def test_models_outside_the_llama_family_decode_through_their_own_forward(model: Any) -> None:
    import copy

    other = copy.deepcopy(model)
    other.config.hidden_act = "gelu"  # formulas of DecodeStep assume SiLU
    assert DecodeStep.of(other) is None

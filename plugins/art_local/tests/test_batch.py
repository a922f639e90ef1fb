"""Trajectories → packed token tensors: chat template, exact sampled ids, masks, advantages, packing."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import art_core as art
from art_core.advantages import group_advantages, normalize_batch
from art_local.training import (
    PackSequence,
    TrainerConfig,
    attention_mask_B1TT,
    build_components,
    compute_logprobs,
    pack_sequences,
    prepare_batch,
    tokenize_history,
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def test_a_choice_contributes_exactly_its_sampled_ids_after_the_servers_prompt(
    tiny_tokenizer: Any, make_choice: Callable[..., Any]
) -> None:
    letters = [tiny_tokenizer.convert_tokens_to_ids(c) for c in "acd"]
    assert (
        tiny_tokenizer.encode("acd", add_special_tokens=False) != letters
    )  # BPE would merge: ids must be kept
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort these letters: d a c"},
    ]
    choice = make_choice(letters, [-0.1, -0.2, -0.3, -0.4])
    history = tokenize_history([*messages, choice], None, tiny_tokenizer)
    assert history is not None
    prompt = _prompt_ids(tiny_tokenizer, messages)
    assert list(history.tokens) == [*prompt, *letters, tiny_tokenizer.eos_token_id]
    assert list(history.trained) == [False] * len(prompt) + [True] * 4
    assert all(math.isnan(v) for v in history.logprobs[: len(prompt)])
    assert list(history.logprobs[len(prompt) :]) == pytest.approx([-0.1, -0.2, -0.3, -0.4])


def test_multi_turn_with_tools_and_tool_calls(tiny_tokenizer: Any, make_choice: Callable[..., Any]) -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    first = make_choice('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', -0.5)
    first = first.model_copy(update={"message": first.message.model_copy(update={"tool_calls": None})})
    second = make_choice("3 degrees", -0.25)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
    tool = {"role": "tool", "tool_call_id": call["id"], "content": "3 degrees"}
    history = tokenize_history([*messages, first, tool, second], TOOLS, tiny_tokenizer)
    assert history is not None
    prompt = _prompt_ids(tiny_tokenizer, messages, TOOLS)
    assert "get_weather" in tiny_tokenizer.decode(prompt) and "# Tools" in tiny_tokenizer.decode(prompt)
    first_ids = [int(entry.token.split(":")[1]) for entry in first.logprobs.content]
    second_ids = [int(entry.token.split(":")[1]) for entry in second.logprobs.content]
    tokens = list(history.tokens)
    assert tokens[: len(prompt)] == prompt
    assert tokens[len(prompt) : len(prompt) + len(first_ids)] == first_ids
    between = tokens[len(prompt) + len(first_ids) : len(tokens) - len(second_ids)]
    # the sampled <|im_end|> closes the turn: the template's own copy is not repeated
    assert (
        tiny_tokenizer.decode(between) == "\n<|im_start|>tool\n3 degrees<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokens[-len(second_ids) :] == second_ids
    assert sum(history.trained) == len(first_ids) + len(second_ids)


def test_logprob_tokens_must_map_to_ids(tiny_tokenizer: Any, make_choice: Callable[..., Any]) -> None:
    user = {"role": "user", "content": "hi"}
    as_vocab = make_choice(
        " d a", token_format=lambda token_id: tiny_tokenizer.convert_ids_to_tokens(token_id)
    )
    mapped = tokenize_history([user, as_vocab], None, tiny_tokenizer)
    by_id = tokenize_history([user, make_choice(" d a")], None, tiny_tokenizer)
    assert mapped is not None and by_id is not None and mapped.tokens == by_id.tokens
    unmappable = make_choice(" d a", token_format=lambda token_id: f"piece {token_id}?")
    with pytest.raises(ValueError, match="token_id:<id>"):
        tokenize_history([user, unmappable], None, tiny_tokenizer, where="group 0, trajectory 1")
    out_of_range = make_choice(" d", token_format=lambda token_id: "token_id:99999")
    with pytest.raises(ValueError, match="group 0"):
        tokenize_history([user, out_of_range], None, tiny_tokenizer, where="group 0")


def test_choices_without_logprobs(tiny_tokenizer: Any, make_choice: Callable[..., Any]) -> None:
    user = {"role": "user", "content": "Sort these letters: d a c"}
    plain = make_choice("acd", with_logprobs=False)
    groups = [
        art.TrajectoryGroup([art.Trajectory(messages_and_choices=[user, plain], reward=r) for r in (0, 1)])
    ]
    with pytest.raises(ValueError, match=r"logprobs=True"):
        prepare_batch(groups, tiny_tokenizer)
    prepared = prepare_batch(groups, tiny_tokenizer, allow_training_without_logprobs=True)
    assert prepared.batch is not None
    history = tokenize_history([user, plain], None, tiny_tokenizer, allow_training_without_logprobs=True)
    assert history is not None
    content = [*tiny_tokenizer.encode("acd", add_special_tokens=False), tiny_tokenizer.eos_token_id]
    assert list(history.tokens[-len(content) :]) == content and sum(history.trained) == len(content)
    assert all(math.isnan(v) for v in history.logprobs)
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
    }
    tool_choice = make_choice("", with_logprobs=False, eos=True, tool_calls=[call])
    tooled = tokenize_history(
        [user, tool_choice], TOOLS, tiny_tokenizer, allow_training_without_logprobs=True
    )
    assert tooled is not None
    trained_text = tiny_tokenizer.decode([t for t, m in zip(tooled.tokens, tooled.trained, strict=True) if m])
    assert (
        trained_text
        == '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call><|im_end|>'
    )
    dict_only = [art.TrajectoryGroup([art.Trajectory(messages_and_choices=[user], reward=r) for r in (0, 1)])]
    with pytest.raises(ValueError, match="no Choice with logprobs"):
        prepare_batch(dict_only, tiny_tokenizer)


def test_advantages_and_weights_come_from_art_core(
    tiny_tokenizer: Any, sort_groups: Callable[..., list[Any]]
) -> None:
    groups = sort_groups(2, rewards=(1.0, 0.5, 0.0, 0.0))
    prepared = prepare_batch(groups, tiny_tokenizer, advantage_balance=0.3)
    batch = prepared.batch
    assert batch is not None
    advantages = [a for g in groups for a in group_advantages([t.reward for t in g.trajectories])]
    counts = [
        len(g.trajectories[i].messages_and_choices[1].logprobs.content) for g in groups for i in range(4)
    ]
    expected = normalize_batch(advantages, counts, advantage_balance=0.3)
    for index, (advantage, weight) in enumerate(
        zip(expected.advantages, expected.token_weights, strict=True)
    ):
        trained = batch.loss_mask_BT & (batch.sequence_index_BT == index)
        assert int(trained.sum()) == counts[index]
        assert batch.advantages_BT[trained].tolist() == pytest.approx([advantage] * counts[index], rel=1e-6)
        assert batch.weights_BT[trained].tolist() == pytest.approx([weight] * counts[index], rel=1e-6)
    assert float(batch.weights_BT[batch.loss_mask_BT].mean()) == pytest.approx(1.0, rel=1e-6)
    assert prepared.metrics()["data/step_num_trajectories"] == 8
    assert prepared.metrics()["data/step_trainer_tokens"] == sum(counts)


def test_additional_histories_get_the_trajectorys_advantage(
    tiny_tokenizer: Any, make_choice: Callable[..., Any]
) -> None:
    def trajectory(reward: float) -> art.Trajectory:
        extra = art.History(messages_and_choices=[{"role": "user", "content": "sub task"}, make_choice("ok")])
        main = [{"role": "user", "content": "main task"}, make_choice("done")]
        return art.Trajectory(messages_and_choices=main, additional_histories=[extra], reward=reward)

    prepared = prepare_batch([art.TrajectoryGroup([trajectory(1.0), trajectory(0.0)])], tiny_tokenizer)
    batch = prepared.batch
    assert batch is not None and len(prepared.sequences) == 4
    for index, sequence in enumerate(prepared.sequences):
        trained = batch.loss_mask_BT & (batch.sequence_index_BT == index)
        assert batch.advantages_BT[trained].tolist() == pytest.approx(
            [sequence.advantage] * int(trained.sum())
        )
    assert [s.advantage > 0 for s in prepared.sequences] == [True, True, False, False]


def test_overlong_sequences_are_dropped_with_a_warning_and_counted(
    tiny_tokenizer: Any, make_choice: Callable[..., Any]
) -> None:
    user = {"role": "user", "content": "Sort these letters: d a c"}
    long_answer = make_choice("acd " * 40)
    trajectories = [
        art.Trajectory(messages_and_choices=[user, long_answer], reward=1.0),
        art.Trajectory(messages_and_choices=[user, make_choice("acd")], reward=0.0),
    ]
    with pytest.warns(RuntimeWarning, match="max_sequence_length=40"):
        prepared = prepare_batch([art.TrajectoryGroup(trajectories)], tiny_tokenizer, max_sequence_length=40)
    assert prepared.metrics()["data/step_num_sequences_dropped"] == 1
    assert prepared.num_trajectories == 1 and prepared.batch is not None
    assert prepared.batch.tokens_BT.shape[1] <= 40


def test_groups_without_signal_train_nothing(
    tiny_tokenizer: Any, sort_groups: Callable[..., list[Any]]
) -> None:
    prepared = prepare_batch(sort_groups(2, rewards=(1.0, 1.0, 1.0, 1.0)), tiny_tokenizer)
    assert prepared.batch is None
    metrics = prepared.metrics()
    assert metrics["data/step_num_groups_submitted"] == 2 and metrics["data/step_num_groups_trainable"] == 0
    assert metrics["data/step_trainer_tokens"] == 0


def _sequence(tokens: list[int], first_trained: int, group: int = 0) -> PackSequence:
    trained = tuple(index >= first_trained for index in range(len(tokens)))
    return PackSequence(
        tuple(tokens), trained, tuple(-1.0 if t else math.nan for t in trained), 1.0, 1.0, group
    )


def test_packing_shares_the_group_prompt_and_keeps_siblings_apart() -> None:
    prompt = [5, 6, 7, 8]
    sequences = [
        _sequence([*prompt, 10, 11], 4),
        _sequence([*prompt, 20, 21, 22], 4),
        _sequence([1, 2, 3], 1, 1),
    ]
    batch = pack_sequences(sequences, capacity=64)
    assert batch.tokens_BT.shape == (
        1,
        3 + 3 + 4 + 3,
    )  # prompt minus its last token once, each branch restarts
    row = batch.tokens_BT[0].tolist()
    assert row.count(5) == 1 and row.count(8) == 2
    mask = attention_mask_B1TT(batch)[0, 0]
    first_branch = (batch.sequence_index_BT[0] == 0).nonzero().flatten().tolist()
    second_branch = (batch.sequence_index_BT[0] == 1).nonzero().flatten().tolist()
    prefix = [
        i
        for i in range(len(row))
        if batch.segment_ids_BT[0, i] == batch.prefix_segment_ids_BT[0, first_branch[0]]
    ]
    assert len(prefix) == 3
    for query in second_branch:
        assert all(mask[query, key] for key in prefix)  # sees the shared prompt
        assert not any(mask[query, key] for key in first_branch)  # never its sibling
    assert batch.position_ids_BT[0, second_branch].tolist() == [3, 4, 5, 6]
    other = (batch.sequence_index_BT[0] == 2).nonzero().flatten().tolist()
    assert not any(mask[query, key] for query in other for key in prefix + first_branch + second_branch)
    assert batch.num_trained_tokens == 2 + 3 + 2


def test_packing_respects_capacity_and_repeats_the_prompt_when_a_group_is_split() -> None:
    prompt = list(range(30, 40))
    sequences = [_sequence([*prompt, 100 + i, 101 + i, 102 + i], 10) for i in range(6)]
    batch = pack_sequences(sequences, capacity=24)
    assert batch.tokens_BT.shape[1] <= 24 and batch.tokens_BT.shape[0] >= 2
    assert int((batch.tokens_BT == 30).sum()) == batch.tokens_BT.shape[0]  # one prompt copy per row
    assert batch.num_trained_tokens == 6 * 3
    with pytest.raises(ValueError, match="more than capacity"):
        pack_sequences([_sequence(list(range(30)), 5)], capacity=24)
    with pytest.raises(ValueError, match="first token"):
        pack_sequences([_sequence([1, 2, 3], 0)], capacity=24)


def test_packed_and_unpacked_logprobs_agree(
    tiny_model_dir: Path, tiny_tokenizer: Any, sort_groups: Callable[..., list[Any]]
) -> None:
    prepared = prepare_batch(sort_groups(3), tiny_tokenizer)
    assert prepared.batch is not None
    components = build_components(tiny_model_dir, TrainerConfig(lora_rank=None), device="cpu")
    packed = prepared.batch
    unpacked = pack_sequences(prepared.sequences, capacity=64, share_prompts=False)
    one_per_row = [pack_sequences([sequence], capacity=64) for sequence in prepared.sequences]
    assert packed.tokens_BT.numel() < unpacked.tokens_BT.numel()  # the prompt is computed once per group
    packed_lp = compute_logprobs(components, packed)
    unpacked_lp = compute_logprobs(components, unpacked)
    for index in range(len(prepared.sequences)):
        alone = compute_logprobs(components, one_per_row[index])
        reference = alone[one_per_row[index].loss_mask_BT]
        for batch, logprobs in ((packed, packed_lp), (unpacked, unpacked_lp)):
            picked = logprobs[batch.loss_mask_BT & (batch.sequence_index_BT == index)]
            torch.testing.assert_close(picked, reference, atol=1e-5, rtol=0)


def test_the_per_batch_template_cache_changes_nothing(
    tiny_tokenizer: Any, sort_groups: Callable[..., list[Any]]
) -> None:
    groups = sort_groups(2)
    prepared = prepare_batch(groups, tiny_tokenizer)
    uncached = [
        tokenize_history(t.messages_and_choices, t.tools, tiny_tokenizer)
        for g in groups
        for t in g.trajectories
    ]
    assert [s.tokens for s in prepared.sequences] == [h.tokens for h in uncached if h is not None]
    assert [s.trained for s in prepared.sequences] == [h.trained for h in uncached if h is not None]

"""art_core's SFT pieces: the JSONL reader (streaming, errors by line), options, batch plan and schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import art_core as art
from art_core.sft import SFTOptions, sft_conversations
from art_core.trajectories import is_choice

TOOL = {"type": "function", "function": {"name": "sort", "parameters": {"type": "object", "properties": {}}}}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _record(**extra: object) -> str:
    messages = [
        {"role": "system", "content": "Sort letters."},
        {"role": "user", "content": "c b a"},
        {"role": "assistant", "content": "abc"},
    ]
    return json.dumps({"messages": messages, **extra})


def test_reads_openai_fine_tuning_jsonl_into_trajectories_with_tools(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", [_record(), "", _record(tools=[TOOL], parallel_tool_calls=False)])
    first, second = list(art.read_sft_jsonl(path))
    assert isinstance(first, art.Trajectory) and first.tools is None
    assert first.messages_and_choices[-1] == {"role": "assistant", "content": "abc"}
    assert second.tools == [TOOL]


def test_reading_is_streaming_and_a_bad_record_names_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", [_record(), _record(), "{not json"])
    records = art.read_sft_jsonl(path)
    assert isinstance(next(records), art.Trajectory)  # yielded before the bad line is ever read
    next(records)
    with pytest.raises(art.SFTDataError, match=r"data\.jsonl:3: not valid JSON") as caught:
        next(records)
    assert caught.value.line == 3


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ("[1, 2]", "JSON object with 'messages', not a list"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user", "content": "hi"}], "prompt": "x"}', "unknown keys ['prompt']"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "message 0 has role 'bot'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message to train on"),
        ('{"messages": [{"role": "assistant"}]}', "neither 'content' nor 'tool_calls'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "'content' must be a string"),
        ('{"messages": [{"role": "assistant", "content": "a", "weight": 2}]}', "weight 2"),
        ('{"messages": [{"role": "assistant", "content": "a"}], "tools": {}}', "'tools' must be a list"),
    ],
)
def test_each_kind_of_bad_record_is_named(tmp_path: Path, record: str, problem: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [_record(), record])
    with pytest.raises(art.SFTDataError, match=r"bad\.jsonl:2: ") as caught:
        list(art.read_sft_jsonl(path))
    assert problem in str(caught.value)


def test_targets_are_the_assistant_turns_and_weight_zero_is_context() -> None:
    trajectory = art.Trajectory(
        messages_and_choices=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "one", "weight": 0},
            {"role": "user", "content": "b"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "sort", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
        ]
    )
    ((items, _),) = sft_conversations([trajectory], "all")
    targets = [item for item in items if is_choice(item)]
    assert [t.finish_reason for t in targets] == ["tool_calls", "stop"]
    assert targets[1].message.content == "two" and items[1] == {"role": "assistant", "content": "one"}
    ((last, _),) = sft_conversations([trajectory], "last")
    assert [item.message.content for item in last if is_choice(item)] == ["two"]


def test_the_plan_covers_every_example_each_epoch_and_is_seeded() -> None:
    options = SFTOptions(epochs=3, batch_size=4)
    plan = options.plan(10)
    assert [len(batch) for batch in plan] == [4, 4, 2] * 3
    for epoch in range(3):
        assert sorted(i for batch in plan[epoch * 3 : epoch * 3 + 3] for i in batch) == list(range(10))
    assert plan == SFTOptions(epochs=3, batch_size=4).plan(10) and plan[:3] != plan[3:6]
    assert SFTOptions(batch_size=4, shuffle_seed=None).plan(6) == [(0, 1, 2, 3), (4, 5)]


def test_warmup_then_cosine_or_constant() -> None:
    cosine = SFTOptions(learning_rate=1.0, warmup_ratio=0.2)
    rates = [cosine.learning_rate_at(i, 10) for i in range(10)]
    assert rates[0] == pytest.approx(1 / 3) and rates[1] == pytest.approx(2 / 3) and rates[2] == 1.0
    assert all(a > b for a, b in zip(rates[2:], rates[3:], strict=False)) and rates[-1] > 0
    constant = SFTOptions(learning_rate=1.0, schedule="constant")
    assert [constant.learning_rate_at(i, 5) for i in range(5)] == [1.0] * 5
    assert math.isclose(SFTOptions(learning_rate=1.0).learning_rate_at(5, 10), 0.5)


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"learning_rate": math.nan}, "learning_rate=nan"),
        ({"learning_rate": "1e-4"}, "learning_rate='1e-4'"),
        ({"epochs": True}, "epochs=True"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"assistant_turns": "every"}, "assistant_turns='every'; use one of 'all', 'last'"),
        ({"schedule": "linear"}, "schedule='linear'; use one of 'cosine', 'constant'"),
        ({"warmup_ratio": -0.1}, "warmup_ratio=-0.1"),
        ({"shuffle_seed": 1.5}, "shuffle_seed=1.5"),
    ],
)
def test_bad_options_are_value_errors_naming_them(options: dict[str, object], text: str) -> None:
    with pytest.raises(ValueError) as caught:
        SFTOptions(**options)  # type: ignore[arg-type]
    assert text in str(caught.value)


def test_the_protocol_is_exported_and_light() -> None:
    assert art.SFTBackend.__name__ == "SFTBackend" and "train_sft" in dir(art.SFTBackend)

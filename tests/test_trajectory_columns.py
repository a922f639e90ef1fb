"""The columnar table builder: what each message becomes, on the plain-dict fast path and the mixed path."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from core_support import make_choice
from openai.types.chat.chat_completion import Choice

import art_core as art
from art_core.trajectory_columns import encode_json, groups_to_table
from art_core.trajectory_parquet import write_trajectory_groups

CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
PLAIN = [
    {"role": "system", "content": [{"type": "text", "text": "hé"}]},  # multi-part content
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "ok", "name": "extra keys are ignored"},
    {"role": "user", "content": "thanks", "tool_calls": []},
]


def messages(groups: list[art.TrajectoryGroup], tmp_path: Path) -> list[list[dict[str, object]]]:
    """The messages column as pyarrow and polars read it back from disk (they must agree)."""
    path = tmp_path / "0000.parquet"
    write_trajectory_groups(groups, path)
    from_arrow: list[list[dict[str, object]]] = pq.read_table(path).column("messages").to_pylist()
    assert pl.read_parquet(path)["messages"].to_list() == from_arrow
    return from_arrow


@pytest.mark.parametrize("with_string_content_only", [True, False])
def test_plain_messages_keep_tool_calls_and_multi_part_content_as_json(
    tmp_path: Path, with_string_content_only: bool
) -> None:
    items = PLAIN[1:] if with_string_content_only else PLAIN
    rows = messages([art.TrajectoryGroup([art.Trajectory(messages_and_choices=items)])], tmp_path)
    by_role = {m["role"]: m for m in rows[0]}
    assert json.loads(str(by_role["assistant"]["tool_calls"])) == [CALL]
    assert by_role["tool"] == {
        "role": "tool",
        "content": "ok",
        "tool_calls": None,
        "tool_call_id": "c1",
        "trainable": False,
    }
    assert by_role["user"]["tool_calls"] is None  # an empty list is stored as null, as in ART
    if not with_string_content_only:
        assert json.loads(str(by_role["system"]["content"])) == [{"type": "text", "text": "hé"}]
    assert not any(m["trainable"] for m in rows[0])


def test_choices_are_trainable_and_their_tool_calls_are_json(tmp_path: Path) -> None:
    tool_choice = Choice.model_validate(
        {"finish_reason": "tool_calls", "index": 0, "message": {"role": "assistant", "tool_calls": [CALL]}}
    )
    trajectory = art.Trajectory(messages_and_choices=[*PLAIN, tool_choice, make_choice("done")])
    rows = messages([art.TrajectoryGroup([trajectory, art.Trajectory()])], tmp_path)
    assert [m["trainable"] for m in rows[0]] == [False] * len(PLAIN) + [True, True]
    assert json.loads(str(rows[0][-2]["tool_calls"]))[0]["function"]["name"] == "lookup"
    assert rows[0][-1]["content"] == "done" and rows[1] == []


def test_group_columns_repeat_per_trajectory_and_exceptions_are_not_rows() -> None:
    groups = [
        art.TrajectoryGroup([art.Trajectory(reward=1.0)] * 2, metadata={"id": "a"}, logs=["g"]),
        art.TrajectoryGroup([], exceptions=[ValueError("boom")]),
        art.TrajectoryGroup([art.Trajectory(reward=0.5, metrics={"n": 2}, metadata={"k": "é"})]),
    ]
    table = groups_to_table(groups).to_pydict()
    assert table["group_index"] == [0, 0, 2]
    assert table["group_metadata"] == ['{"id": "a"}', '{"id": "a"}', None]
    assert table["group_logs"] == [["g"], ["g"], None]
    assert table["metrics"] == [None, None, '{"n": 2}']
    assert table["metadata"][2] == json.dumps({"k": "é"})


def test_a_message_that_is_neither_dict_nor_choice_is_named() -> None:
    trajectory = art.Trajectory(messages_and_choices=[{"role": "user", "content": "hi"}])
    trajectory.messages_and_choices.append(42)  # type: ignore[arg-type]  # appended after validation
    with pytest.raises(TypeError, match=r"holds a int \('42'\); expected an OpenAI message dict"):
        groups_to_table([art.TrajectoryGroup([trajectory])])


def test_encoder_writes_what_json_dumps_writes() -> None:
    values = [{"a": 1.5, "b": [True, None, "é\n"], "c": {"d": 2}}, ["x"], "s", make_choice()]
    for value in values:
        assert encode_json(value) == json.dumps(value, default=lambda v: v.model_dump(mode="json"))

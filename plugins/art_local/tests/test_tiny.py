"""art_local.tiny: seeded, offline, loadable, with a chat template that renders tools and tool calls."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from art_local.tiny import build_tiny_model, model_shape


def _digests(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def test_same_seed_gives_identical_files_and_another_seed_other_weights(tmp_path: Path) -> None:
    first = build_tiny_model("tiny", seed=3, directory=tmp_path / "a")
    second = build_tiny_model("tiny", seed=3, directory=tmp_path / "b")
    other = build_tiny_model("tiny", seed=4, directory=tmp_path / "c")
    assert _digests(first) == _digests(second)
    expected_files = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected_files <= set(_digests(first))
    assert _digests(first)["model.safetensors"] != _digests(other)["model.safetensors"]
    # one tokenizer for every seed
    assert _digests(first)["tokenizer.json"] == _digests(other)["tokenizer.json"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging dir left


def test_default_location_is_the_cache_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ART_CACHE_DIR", str(tmp_path))
    built = build_tiny_model("tiny", seed=1)
    assert built == tmp_path / "tiny" / built.name and built.name.startswith("tiny-seed1-v")
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model("tiny", seed=1) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_loads_with_auto_classes_and_generates(tmp_path: Path) -> None:
    directory = build_tiny_model("tiny", directory=tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert 150_000 < sum(p.numel() for p in model.parameters()) < 300_000
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer) == 1024
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    text = "Sort these letters: d a c"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level BPE round trip
    prompt = torch.tensor([tokenizer(text)["input_ids"]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt.shape[1]


def test_small_has_about_18m_parameters() -> None:
    hidden, layers, heads, kv_heads, mlp = model_shape("small")
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * mlp + 2 * hidden
    total = layers * per_layer + 2 * 1024 * hidden + hidden
    assert 16_000_000 < total < 20_000_000
    with pytest.raises(ValueError, match="unknown"):
        model_shape("huge")  # type: ignore[arg-type]


def test_chat_template_renders_messages_tools_and_tool_calls(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model("tiny", directory=tmp_path / "m"))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3 degrees"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n"
        + json.dumps(tools[0])
        + '\nTo call a tool, answer with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
        "<|im_end|>\n<|im_start|>tool\n3 degrees<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"
    ids = tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.eos_token_id in ids

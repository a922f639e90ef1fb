"""An offline, seeded tiny causal LM and tokenizer for tests, the demo and benchmarks (no model hub needed).

``build_tiny_model("tiny")`` (~0.2M parameters) or ``build_tiny_model("small")`` (~18M) returns a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load: a Llama-style config,
safetensors weights, a byte-level BPE tokenizer trained with ``tokenizers`` on a generated corpus, and a
ChatML-like chat template that renders tools and tool calls. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

from art_core.plugin_api import atomic_replace_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TinySize: TypeAlias = Literal["tiny", "small"]

# Bump when anything below changes the files, so caches built by an older version are not reused.
TINY_FORMAT_VERSION = 1
VOCAB_SIZE = 1024
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# (hidden, layers, attention heads, kv heads, mlp width): tiny ≈ 0.23M parameters, small ≈ 17.8M.
_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 2, 192),
    "small": (512, 5, 8, 4, 1664),
}

# ChatML-like. Whitespace is emitted only through explicit '\n' expressions so the template reads plainly.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(skip_first=false) -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- messages[0].content + '\\n\\n' -}}{%- set ns.skip_first = true -%}"
    "{%- endif -%}"
    "{{- '# Tools\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    '{{- \'To call a tool, answer with <tool_call>{"name": ..., "arguments": ...}</tool_call>\' -}}'
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and ns.skip_first) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- elif message.content -%}"
    "{%- for part in message.content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message.tool_calls -%}"
    "{%- for tool_call in message.tool_calls -%}"
    "{%- set fn = tool_call.function if tool_call.function is defined else tool_call -%}"
    "{%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>{\"name\": ' + (fn.name | tojson) + ', \"arguments\": ' -}}"
    "{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}"
    "{{- '}</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_WORDS = (
    "the a an and or of to in on at for with from by is are was be it this that what which who how why "
    "sort these letters numbers answer question reply call tool function name arguments city weather "
    "temperature today tomorrow search result find list add sum total value true false yes no hello world "
    "please thanks user assistant system model train reward step agent task game move left right up down "
    "first second third last next before after small large big number word letter digit count order"
).split()
_CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lima", "Cairo", "Delhi")


def default_cache_dir() -> Path:
    """``$ART_CACHE_DIR/tiny`` or ``~/.cache/art/tiny``."""
    root = os.environ.get("ART_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "art") / "tiny"


def model_shape(size: TinySize) -> tuple[int, int, int, int, int]:
    """(hidden, layers, attention heads, kv heads, mlp width) of a size."""
    if size not in _SHAPES:
        raise ValueError(f"size {size!r} is unknown; use one of {sorted(_SHAPES)}")
    return _SHAPES[size]


def build_tiny_model(size: TinySize = "tiny", *, seed: int = 0, directory: str | Path | None = None) -> Path:
    """Build (once, atomically) and return the directory of a seeded tiny Llama-style model and tokenizer."""
    model_shape(size)
    target = (
        Path(directory)
        if directory is not None
        else default_cache_dir() / f"{size}-seed{seed}-v{TINY_FORMAT_VERSION}"
    )
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    # another process may finish the same build first: its complete copy is as good as ours
    atomic_replace_dir(target, lambda staging: _write_model(staging, size, seed), keep_existing=True)
    if not (target / "model.safetensors").is_file():
        raise FileExistsError(
            f"{target} exists but holds no complete tiny model; delete it or pick another directory"
        )
    return target


def corpus_lines() -> list[str]:
    """The deterministic text the tokenizer is trained on: chat turns, tool calls, letters, digits, words."""
    rng = random.Random(1234)
    letters = "abcdefghij"
    lines: list[str] = []
    for _ in range(3000):
        picked = rng.sample(letters, 3)
        answer = "".join(sorted(picked))
        lines.append(
            f"{IM_START}user\nSort these letters: {' '.join(picked)}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"
        )
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{IM_START}user\nWhat is {a} + {b}?{IM_END}\n{IM_START}assistant\n{a + b}{IM_END}\n")
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        lines.append(f"{IM_START}system\n{sentence.capitalize()}.{IM_END}\n")
        city = rng.choice(_CITIES)
        arguments = json.dumps({"city": city, "days": rng.randint(1, 7)})
        lines.append(
            f'{IM_START}assistant\n<tool_call>{{"name": "get_weather", "arguments": {arguments}}}</tool_call>{IM_END}\n'
            f"{IM_START}tool\n{rng.randint(-10, 35)} degrees in {city}{IM_END}\n"
        )
    return lines


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer (vocab 1024) trained on ``corpus_lines()``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    return tokenizer


def _write_model(directory: Path, size: TinySize, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = train_tokenizer()
    eos_id, pad_id = bpe.token_to_id(IM_END), bpe.token_to_id(PAD_TOKEN)
    assert eos_id is not None and pad_id is not None
    tokenizer = cast(Any, PreTrainedTokenizerFast)(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == VOCAB_SIZE, f"tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}"
    hidden, layers, heads, kv_heads, mlp = model_shape(size)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = cast(Any, GenerationConfig)(
        bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=True, temperature=1.0
    )
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    _make_tokenizer_config_portable(directory / "tokenizer_config.json")


def _make_tokenizer_config_portable(path: Path) -> None:
    """Name the generic fast tokenizer class so transformers 4.x (e.g. next to vLLM) loads the files too."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    extra = config.pop("extra_special_tokens", [IM_START])
    config["additional_special_tokens"] = list(extra)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

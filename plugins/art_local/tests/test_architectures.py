"""Architectures beyond Llama: the trainer and the transformers engine pick an attention implementation each
architecture has (Gemma 2 has no sdpa path in transformers, and forcing it failed at register)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import art_core as art
from art_local.backend import LocalBackend
from art_local.tiny import build_tiny_model
from art_local.training import TrainerConfig
from art_local.training.state import attention_implementation


def tiny_gemma2(directory: Path) -> Path:
    """A random 2-layer Gemma 2 (head_dim 32, soft-capped logits, sliding window) with the tiny tokenizer."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model("tiny"))
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_attention_is_sdpa_where_the_architecture_has_it_else_eager(tmp_path: Path) -> None:
    assert attention_implementation(build_tiny_model("tiny")) == "sdpa"  # Llama
    assert attention_implementation(tiny_gemma2(tmp_path / "gemma2")) == "eager"


async def test_gemma2_registers_samples_and_trains_on_the_transformers_engine(tmp_path: Path) -> None:
    base = tiny_gemma2(tmp_path / "gemma2")
    backend = LocalBackend(
        str(tmp_path / "art"), device="cpu", engine="hf", trainer_config=TrainerConfig(lora_rank=4)
    )
    model = art.TrainableModel(name="gemma", project="p", base_model=str(base))
    await model.register(backend)
    messages: Any = [{"role": "user", "content": "Sort these letters: b a"}]
    response = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(), messages=messages, n=4, max_tokens=6, logprobs=True, seed=0
    )
    group = art.TrajectoryGroup(
        art.Trajectory(messages_and_choices=[*messages, choice], reward=float(i))
        for i, choice in enumerate(response.choices)
    )
    result = await backend.train(model, [group], learning_rate=1e-2)
    assert result.step == 1 and result.metrics["data/step_num_gradient_steps"] == 1.0
    served = [m.id for m in (await model.openai_client().models.list()).data]
    assert "gemma@1" in served
    await backend.close()

"""Architectures beyond Llama: the trainer and the transformers engine pick an attention implementation each
architecture has (Gemma 2 has no sdpa path in transformers, and forcing it failed at register)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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


def _random_model(directory: Path, family: str) -> Path:
    """A random 2-layer GPT-2 (Conv1D layers, dropout 0.1 by default) or Qwen2 (attention biases, tied
    embeddings) with the tiny tokenizer: model families this project did not build."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model("tiny"))
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    torch.manual_seed(0)
    if family == "gpt2":
        config: Any = GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=512, **ids)
        assert config.resid_pdrop > 0 and config.attn_pdrop > 0  # what the trainer must switch off
        GPT2LMHeadModel(config).save_pretrained(directory)
    else:
        config = Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **ids,
        )
        Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("family", "targets"),
    [("gpt2", ("c_attn", "c_proj", "c_fc")), ("qwen2", ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))],
)
async def test_sampler_and_trainer_agree_on_other_model_families_before_and_after_a_step(
    tmp_path: Path, family: str, targets: tuple[str, ...]
) -> None:
    """Same weights, same logprobs (fp32, 1e-4), at step 0 and once a LoRA step is published: the trainer runs
    without dropout, and Conv1D layers (merged as tensors) and biased, tied layers (merged in place) serve right."""
    from art_local.training import compute_logprobs, prepare_batch

    base = _random_model(tmp_path / family, family)
    config = TrainerConfig(lora_rank=4, lora_targets=targets, dtype="float32")
    backend = LocalBackend(str(tmp_path / "art"), device="cpu", engine="hf", trainer_config=config)
    model = art.TrainableModel(name="m", project="p", base_model=str(base))
    try:
        await model.register(backend)
        slot = backend._slots["m"]
        assert slot.components is not None
        gaps = []
        for step in range(2):
            messages: Any = [{"role": "user", "content": "Sort these letters: c a b"}]
            response = await model.openai_client().chat.completions.create(
                model=model.get_inference_name(),
                messages=messages,
                n=4,
                max_tokens=8,
                logprobs=True,
                seed=step,
            )
            group = art.TrajectoryGroup(
                art.Trajectory(messages_and_choices=[*messages, choice], reward=float(i))
                for i, choice in enumerate(response.choices)
            )
            prepared = prepare_batch([group], slot.tokenizer)
            assert prepared.batch is not None
            mask = prepared.batch.loss_mask_BT
            trainer = compute_logprobs(slot.components, prepared.batch)[mask]
            gaps.append(float((trainer - prepared.batch.old_logprobs_BT[mask]).abs().max()))
            if step == 0:
                await backend.train(model, [group], learning_rate=5e-2)
        assert max(gaps) < 1e-4, gaps
    finally:
        await backend.close()

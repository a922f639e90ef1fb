"""Quantized LoRA bases (``TrainerConfig(quantization="nf4" | "int8")``): refused where they cannot work, clear
when bitsandbytes cannot run, and where it can: LoRA trains on the quantized base, the served model gives the
trainer's logprobs, and checkpoints are plain peft adapters that load on the unquantized base."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import art_core as art
from art_local.backend import LocalBackend
from art_local.inference.weights import load_weights_into
from art_local.training import (
    StepConfig,
    TrainerConfig,
    TrainingState,
    build_components,
    compute_logprobs,
    forward_backward,
    get_weights,
    merged_weights,
    optim_step,
    pack_sequences,
    quantize,
    save_checkpoint,
    tokenize_history,
)
from art_local.training.checkpoint import merged_state_dict_from_checkpoint
from art_local.training.logprobs import causal_lm
from art_local.training.measure_memory import synthetic_batch
from art_local.training.memory import MemoryPlanError, check_memory_fits, plan_memory

KINDS = ("nf4", "int8")
# max |Δ logprob| between the trainer and the transformers engine serving the same step: the dequantized base
# with the adapter merged, against bitsandbytes' dequantize-then-matmul with the adapter beside it. Measured:
# fp32 ≤ 2e-6 (tiny) and ≤ 8e-6 (small, 18M); bf16 (autocast trainer, bf16 engine) ≤ 1e-3 (tiny).
SERVED_BOUND = {"float32": 1e-5, "bfloat16": 2e-3}
needs_bitsandbytes = pytest.mark.skipif(
    not quantize.quantization_available("cpu"),
    reason=f"bitsandbytes with CPU kernels is not installed ({quantize.INSTALL_HINT})",
)


def test_quantization_needs_lora_and_a_known_kind() -> None:
    with pytest.raises(ValueError, match=r"quantization='nf4' needs LoRA.*lora_rank=None"):
        TrainerConfig(lora_rank=None, quantization="nf4")
    with pytest.raises(ValueError, match=r"quantization='int4' is unknown; use one of none, nf4, int8"):
        TrainerConfig(quantization="int4")  # type: ignore[arg-type]
    assert TrainerConfig(lora_rank=None).quantization == "none"


def test_without_bitsandbytes_the_error_names_the_option_and_the_extra(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    quantize._probe.cache_clear()
    try:
        with pytest.raises(quantize.QuantizationUnavailableError) as caught:
            build_components(tiny_model_dir, TrainerConfig(quantization="nf4"), device="cpu")
        assert not quantize.quantization_available("cpu")
    finally:
        quantize._probe.cache_clear()
    message = str(caught.value)
    assert "TrainerConfig(quantization='nf4')" in message and "art-local[quantization]" in message
    assert "quantization='none'" in message


def test_devices_bitsandbytes_has_no_kernels_for_are_refused_by_name() -> None:
    with pytest.raises(quantize.QuantizationUnavailableError, match=r"runs on cpu or cuda only, not mps"):
        quantize.require_bitsandbytes("int8", torch.device("mps"))


def test_fsdp_cannot_shard_a_quantized_base(tmp_path: Path) -> None:
    from art_local.distributed import DistributedConfig

    with pytest.raises(ValueError, match=r"quantization='nf4'.*strategy='ddp'\) only"):
        LocalBackend(
            str(tmp_path),
            trainer_config=TrainerConfig(quantization="nf4"),
            train_devices=DistributedConfig(nproc_per_node=2, strategy="fsdp", device="cpu"),
        )


def test_plan_counts_quantized_weights_and_suggests_nf4(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    shape = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        vocab_size=32000,
        num_attention_heads=16,
    )
    plans = {
        kind: plan_memory(
            shape,
            sequence_length=512,
            batch_rows=1,
            trainer_config=TrainerConfig(quantization=kind, dtype="bfloat16"),  # type: ignore[arg-type]
            device="cpu",
        )
        for kind in ("none", "int8", "nf4")
    }
    sizes = quantize_sizes(shape)
    assert len(sizes) == 16 * 7  # q, k, v, o, gate, up, down of each layer; not the output layer
    dequantized = 2 * max(sizes) * 2  # the largest layer's weight in bf16, twice, while it computes
    # bf16 → int8 saves 1 byte per linear weight, → NF4 (0.5 byte + an fp32 scale per 64) 1.4375 bytes
    saved_int8 = plans["none"].weights_bytes - plans["int8"].weights_bytes
    saved_nf4 = plans["none"].weights_bytes - plans["nf4"].weights_bytes
    assert saved_int8 == sum(sizes) - dequantized
    assert saved_nf4 == int(1.4375 * sum(sizes)) - dequantized
    assert plans["nf4"].trainable_parameters == plans["none"].trainable_parameters
    between = (plans["nf4"].total_bytes + plans["none"].total_bytes) // 2
    with pytest.raises(MemoryPlanError, match=r"TrainerConfig\(quantization='nf4'\)"):
        check_memory_fits(
            shape, TrainerConfig(dtype="bfloat16"), device="cpu", sequence_length=512, available_bytes=between
        )


def quantize_sizes(model_config: Any) -> list[int]:
    from art_local.training.memory import quantizable_linear_sizes

    return quantizable_linear_sizes(model_config)


def _trained(model_dir: Path, kind: str, dtype: str = "float32", steps: int = 3) -> tuple[Any, Any]:
    config = TrainerConfig(quantization=kind, dtype=dtype)  # type: ignore[arg-type]
    components = build_components(model_dir, config, device="cpu")
    vocab = int(causal_lm(components.model).config.vocab_size)
    state = TrainingState()
    for seed in range(steps):
        batch = synthetic_batch(2, 48, vocab, seed=seed)
        forward_backward(components, batch, StepConfig(learning_rate=2e-2))
        state = optim_step(components, state, learning_rate=2e-2, tokens=batch.num_trained_tokens)
    return components, state


def _logprobs(model: Any, tokens_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logprobs = model(tokens_BT).logits.float().log_softmax(-1)
    return logprobs[:, :-1].gather(-1, tokens_BT[:, 1:, None])[..., 0]


@needs_bitsandbytes
@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_on_the_quantized_base_and_is_served_as_trained(
    tiny_model_dir: Path, tmp_path: Path, kind: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    components, state = _trained(tiny_model_dir, kind)
    assert quantize.is_quantized(components.model)
    adapters = get_weights(components)
    assert adapters and all(value.dtype == torch.float32 for value in adapters.values())
    assert any(value.abs().sum() > 0 for key, value in adapters.items() if "lora_B" in key)  # it trained
    test = synthetic_batch(3, 64, int(causal_lm(components.model).config.vocab_size), seed=99)
    ours = compute_logprobs(components, test)[:, 1:]

    served = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    load_weights_into(served, merged_weights(components))  # what LocalBackend publishes to the HF engine
    assert (_logprobs(served, test.tokens_BT) - ours).abs().max() <= SERVED_BOUND["float32"]

    directory = tmp_path / "0003"
    save_checkpoint(components, state, directory)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in directory.iterdir()}
    adapter_config = json.loads((directory / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and "quantization_config" not in adapter_config
    # an older step reloaded from its checkpoint is served on the same dequantized base
    reloaded = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    load_weights_into(reloaded, merged_state_dict_from_checkpoint(tiny_model_dir, directory))
    assert (_logprobs(reloaded, test.tokens_BT) - ours).abs().max() <= SERVED_BOUND["float32"]
    # a plain peft adapter: it loads on the unquantized base, off by the quantization error alone
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    plain = _logprobs(PeftModel.from_pretrained(base, str(directory)), test.tokens_BT)
    assert 0 < (plain - ours).abs().max() < 0.2


@pytest.fixture
def cpu_dtype(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """What ``dtype="auto"`` computes in for this test, trainer and engine alike: the CPU flags say so."""
    from art_local.cpu_features import FLAGS_ENV, cpu_flags

    monkeypatch.setenv(FLAGS_ENV, "amx_bf16" if request.param == "bfloat16" else "")
    cpu_flags.cache_clear()
    yield request.param
    cpu_flags.cache_clear()


@needs_bitsandbytes
@pytest.mark.parametrize(
    ("kind", "cpu_dtype"),
    [("nf4", "float32"), ("int8", "float32"), ("nf4", "bfloat16")],
    indirect=["cpu_dtype"],
)
async def test_backend_serves_the_quantized_steps_it_trains(
    tmp_path: Path, tiny_model_dir: Path, sort_groups: Any, tiny_tokenizer: Any, kind: str, cpu_dtype: str
) -> None:
    """Step 0 (the quantized base itself) and step 1 answer with the trainer's logprobs."""
    from art_local.training import PackSequence

    config = TrainerConfig(quantization=kind)  # type: ignore[arg-type]
    backend = LocalBackend(str(tmp_path), device="cpu", engine="hf", trainer_config=config)
    try:
        model = art.TrainableModel(name="q", project="p", base_model=str(tiny_model_dir))
        await model.register(backend)
        messages = [{"role": "user", "content": "Sort these letters: d a c"}]
        for step in (0, 1):
            if step:
                await backend.train(model, sort_groups(2), learning_rate=5e-2)
            completion = await model.openai_client().chat.completions.create(
                model=model.get_inference_name(step),
                messages=messages,  # type: ignore[arg-type]
                logprobs=True,
                max_tokens=4,
                seed=3,
            )
            choice = completion.choices[0]
            assert choice.logprobs is not None and choice.logprobs.content
            history = tokenize_history([*messages, choice], None, tiny_tokenizer)
            assert history is not None
            batch = pack_sequences(
                [PackSequence(history.tokens, history.trained, history.logprobs)], capacity=256
            )
            ours = compute_logprobs(backend._slots["q"].components, batch)[batch.loss_mask_BT]
            served = torch.tensor([entry.logprob for entry in choice.logprobs.content])
            bound = SERVED_BOUND[cpu_dtype]
            torch.testing.assert_close(ours, served, atol=bound, rtol=0, msg=f"step {step}")
    finally:
        await backend.close()

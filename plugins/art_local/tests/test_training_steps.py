"""The functional trainer on the tiny model: steps, chunked logprobs, references, checkpoints, merged weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from art_local.inference.weights import load_weights_into
from art_local.training import (
    CheckpointMismatchError,
    LossConfig,
    LowRankMerge,
    StepConfig,
    TrainBatch,
    TrainerConfig,
    TrainingComponents,
    TrainingState,
    build_components,
    compute_logprobs,
    forward_backward,
    forward_backward_custom,
    get_weights,
    load_checkpoint,
    load_weights,
    merged_state_dict,
    merged_state_dict_from_checkpoint,
    merged_weights,
    optim_step,
    pack_sequences,
    prepare_batch,
    save_checkpoint,
)
from art_local.training.logprobs import causal_lm
from art_local.training.steps import reference_logprobs

LORA = TrainerConfig(lora_rank=4)
FULL = TrainerConfig(lora_rank=None)


def rate(config: TrainerConfig) -> float:
    """The learning rate these tests step each kind of model at."""
    return 1e-3 if config.full_fine_tune else 1e-2


@pytest.fixture(scope="module")
def batch(tiny_tokenizer: Any, sort_groups: Callable[..., list[Any]]) -> TrainBatch:
    prepared = prepare_batch(sort_groups(2), tiny_tokenizer)
    assert prepared.batch is not None
    return prepared.batch


def _grads(components: TrainingComponents) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in components.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", [LORA, FULL], ids=["lora", "full"])
def test_a_step_returns_new_state_and_changes_only_trainable_weights(
    tiny_model_dir: Path, batch: TrainBatch, config: TrainerConfig
) -> None:
    components = build_components(tiny_model_dir, config, device="cpu")
    trainable = {n for n, p in components.model.named_parameters() if p.requires_grad}
    assert (trainable == {n for n, _ in components.model.named_parameters()}) == config.full_fine_tune
    before = {n: p.detach().clone() for n, p in components.model.named_parameters()}
    state = TrainingState()
    metrics = forward_backward(components, batch)
    assert set(metrics) == {"loss/train", "loss/entropy"}
    assert 0 < metrics["loss/entropy"] <= torch.log(torch.tensor(1024.0)).item() + 1e-4
    new_state = optim_step(components, state, learning_rate=rate(config), tokens=batch.num_trained_tokens)
    assert state == TrainingState()  # the input state is never mutated
    assert (new_state.step, new_state.weight_version, new_state.tokens_seen) == (
        1,
        1,
        batch.num_trained_tokens,
    )
    assert new_state.grad_norm > 0
    assert all(p.grad is None for p in components.model.parameters())
    changed = {n for n, p in components.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_rewarded_answers_gain_probability(
    tiny_model_dir: Path, tiny_tokenizer: Any, sort_groups: Callable[..., list[Any]]
) -> None:
    prepared = prepare_batch(sort_groups(2), tiny_tokenizer)
    assert prepared.batch is not None
    batch = prepared.batch
    components = build_components(tiny_model_dir, LORA, device="cpu")
    rewarded = batch.loss_mask_BT & (batch.advantages_BT > 0)
    punished = batch.loss_mask_BT & (batch.advantages_BT < 0)
    start = compute_logprobs(components, batch)
    state = TrainingState()
    for _ in range(5):
        forward_backward(components, batch)
        state = optim_step(components, state, learning_rate=rate(LORA))
    end = compute_logprobs(components, batch)
    assert float(end[rewarded].mean()) > float(start[rewarded].mean()) + 0.5
    assert float(end[punished].mean()) < float(start[punished].mean())


def test_logprobs_match_a_plain_forward_pass(tiny_model_dir: Path, batch: TrainBatch) -> None:
    components = build_components(tiny_model_dir, FULL, device="cpu")
    single = pack_sequences([_first_sequence(batch)], capacity=64)
    ours = compute_logprobs(components, single, all_positions=True)
    with torch.no_grad():
        logits = components.model(single.tokens_BT).logits
    expected = torch.log_softmax(logits.float(), -1)[0, :-1].gather(-1, single.tokens_BT[0, 1:, None])[:, 0]
    torch.testing.assert_close(ours[0, 1:], expected, atol=1e-5, rtol=0)
    assert torch.isnan(ours[0, 0])


def _first_sequence(batch: TrainBatch) -> Any:
    from art_local.training import PackSequence

    row = batch.tokens_BT[0]
    length = int((batch.segment_ids_BT[0] == 1).sum()) + int((batch.segment_ids_BT[0] == 2).sum())
    tokens = tuple(int(t) for t in row[:length])
    mask = tuple(bool(m) for m in batch.loss_mask_BT[0, :length])
    return PackSequence(tokens, mask, tuple(-1.0 for _ in tokens))


def test_chunked_unembedding_gives_the_same_logprobs_and_gradients(
    tiny_model_dir: Path, batch: TrainBatch
) -> None:
    components = build_components(tiny_model_dir, FULL, device="cpu")
    lm_head = causal_lm(components.model).get_output_embeddings()
    seen: list[int] = []
    handle = lm_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    try:
        whole = forward_backward(components, batch)
        whole_grads = _grads(components)
        assert max(seen) == batch.num_trained_tokens
        components.optimizer.zero_grad(set_to_none=True)
        seen.clear()
        chunked = forward_backward(components, batch, StepConfig(logprob_calculation_chunk_size=5))
    finally:
        handle.remove()
    assert max(seen) <= 5  # the output layer never sees more than a chunk of positions at once
    assert chunked["loss/train"] == pytest.approx(whole["loss/train"], rel=1e-5)
    assert chunked["loss/entropy"] == pytest.approx(whole["loss/entropy"], rel=1e-5)
    for name, grad in _grads(components).items():
        torch.testing.assert_close(grad, whole_grads[name], atol=1e-6, rtol=1e-4)


def test_micro_batches_accumulate_the_same_gradient(
    tiny_model_dir: Path, tiny_tokenizer: Any, sort_groups: Callable[..., list[Any]]
) -> None:
    prepared = prepare_batch(sort_groups(3), tiny_tokenizer, max_sequence_length=64)
    assert prepared.batch is not None and prepared.batch.tokens_BT.shape[0] >= 2
    components = build_components(tiny_model_dir, FULL, device="cpu")
    whole = forward_backward(components, prepared.batch)
    whole_grads = _grads(components)
    components.optimizer.zero_grad(set_to_none=True)
    components.config = dataclasses.replace(FULL, micro_batch_rows=1)
    micro = forward_backward(components, prepared.batch)
    assert micro["loss/train"] == pytest.approx(whole["loss/train"], rel=1e-5)
    for name, grad in _grads(components).items():
        torch.testing.assert_close(grad, whole_grads[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("config", [LORA, FULL], ids=["lora", "full"])
def test_kl_reference_is_the_base_model(
    tiny_model_dir: Path, batch: TrainBatch, config: TrainerConfig
) -> None:
    components = build_components(tiny_model_dir, config, device="cpu")
    base = compute_logprobs(components, batch)
    state = TrainingState()
    for _ in range(2):
        forward_backward(components, batch)
        state = optim_step(components, state, learning_rate=rate(config))
    trained = compute_logprobs(components, batch)
    reference = reference_logprobs(components, batch, chunk_size=1024)
    mask = batch.loss_mask_BT
    assert not torch.allclose(trained[mask], base[mask], atol=1e-4)
    torch.testing.assert_close(reference[mask], base[mask], atol=1e-5, rtol=0)
    metrics = forward_backward(components, batch, StepConfig(loss=LossConfig(kl_penalty_coef=0.5)))
    expected_kl = float((trained[mask] - base[mask]).mean())
    assert metrics["loss/kl_policy_ref"] == pytest.approx(expected_kl, rel=1e-3)
    components.optimizer.zero_grad(set_to_none=True)


def test_forward_backward_custom_backpropagates_the_given_loss(
    tiny_model_dir: Path, batch: TrainBatch
) -> None:
    components = build_components(tiny_model_dir, LORA, device="cpu")
    received: list[TrainBatch] = []

    def nll(logprobs_BT: torch.Tensor, given: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        received.append(given)
        assert logprobs_BT.requires_grad
        return -(logprobs_BT * given.loss_mask_BT).sum() / given.num_trained_tokens, {"custom/seen": 1.0}

    before = compute_logprobs(components, batch)
    metrics = forward_backward_custom(components, batch, nll)
    assert metrics["custom/seen"] == 1.0 and metrics["loss/train"] > 0 and received
    optim_step(components, TrainingState(), learning_rate=rate(LORA))
    after = compute_logprobs(components, batch)
    mask = batch.loss_mask_BT
    assert float(after[mask].mean()) > float(before[mask].mean())  # minimising NLL raised the logprobs


@pytest.mark.parametrize("config", [LORA, FULL], ids=["lora", "full"])
def test_checkpoint_round_trip_and_merged_weights(
    tiny_model_dir: Path, batch: TrainBatch, tmp_path: Path, config: TrainerConfig
) -> None:
    components = build_components(tiny_model_dir, config, device="cpu")
    forward_backward(components, batch)
    state = optim_step(components, TrainingState(), learning_rate=rate(config), tokens=7)
    assert save_checkpoint(components, state, tmp_path / "0001") == state
    files = {path.name for path in (tmp_path / "0001").iterdir()}
    weights_file = "adapter_model.safetensors" if components.is_lora else "model.safetensors"
    assert {weights_file, "optimizer.pt", "metadata.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    fresh = build_components(tiny_model_dir, config, device="cpu")
    assert load_checkpoint(fresh, tmp_path / "0001") == state
    saved, loaded = get_weights(components), get_weights(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    _assert_same_optimizer_state(components, fresh)
    merged = merged_state_dict(components)
    base_keys = set(causal_lm(build_components(tiny_model_dir, FULL, device="cpu").model).state_dict())
    assert set(merged) == base_keys
    from_disk = merged_state_dict_from_checkpoint(tiny_model_dir, tmp_path / "0001")
    for key in merged:
        torch.testing.assert_close(from_disk[key], merged[key], atol=1e-6, rtol=1e-5)
    # what LocalBackend publishes: LoRA layers merged straight into the served module, no merged tensor between
    lazy = merged_weights(components)
    assert set(lazy) == base_keys
    assert any(isinstance(value, LowRankMerge) for value in lazy.values()) == components.is_lora
    served = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    load_weights_into(served, lazy)
    for key, value in served.state_dict().items():
        torch.testing.assert_close(value, merged[key], atol=1e-6, rtol=1e-5)
    if components.is_lora:  # the merge agrees with peft's own
        reference = components.model.merge_and_unload().state_dict()  # type: ignore[operator]
        for key in merged:
            torch.testing.assert_close(merged[key], reference[key], atol=1e-6, rtol=1e-5)


def _assert_same_optimizer_state(a: TrainingComponents, b: TrainingComponents) -> None:
    state_a, state_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        for name, value in state_a[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[key][name])), (key, name)


def test_adamw_is_fused_on_cpu_takes_the_unfused_step_and_resumes_an_unfused_checkpoint(
    tiny_model_dir: Path, batch: TrainBatch, tmp_path: Path
) -> None:
    fused = build_components(tiny_model_dir, FULL, device="cpu")
    plain = build_components(tiny_model_dir, FULL, device="cpu")
    assert fused.optimizer.param_groups[0]["fused"] is True
    group = plain.optimizer.param_groups[0]
    plain.optimizer = torch.optim.AdamW(  # what build_components made before AdamW was fused
        group["params"], lr=1e-3, betas=FULL.betas, eps=FULL.eps, weight_decay=0.0
    )
    state = TrainingState()
    for components in (fused, plain):
        for _ in range(2):
            forward_backward(components, batch)
            state = optim_step(components, TrainingState(), learning_rate=rate(FULL))
    after_fused, after_plain = get_weights(fused), get_weights(plain)
    for key in after_fused:
        torch.testing.assert_close(after_fused[key], after_plain[key], atol=1e-6, rtol=1e-5)
    save_checkpoint(plain, state, tmp_path / "0002")
    resumed = build_components(tiny_model_dir, FULL, device="cpu")
    load_checkpoint(resumed, tmp_path / "0002")
    assert resumed.optimizer.param_groups[0]["fused"] is True  # this run's kernel, the saved moments
    _assert_same_optimizer_state(plain, resumed)
    for components in (plain, resumed):
        forward_backward(components, batch)
        optim_step(components, state, learning_rate=rate(FULL))
    after_plain, after_resumed = get_weights(plain), get_weights(resumed)
    for key in after_plain:
        torch.testing.assert_close(after_resumed[key], after_plain[key], atol=1e-6, rtol=1e-5)


def test_checkpoint_from_another_config_is_refused_unless_allowed(
    tiny_model_dir: Path, batch: TrainBatch, tmp_path: Path
) -> None:
    components = build_components(tiny_model_dir, LORA, device="cpu")
    save_checkpoint(components, TrainingState(step=3), tmp_path / "0003")
    other = dataclasses.replace(LORA, weight_decay=0.1)
    assert other.fingerprint() != LORA.fingerprint()
    fresh = build_components(tiny_model_dir, other, device="cpu")
    with pytest.raises(
        CheckpointMismatchError, match=r"weight_decay: 0\.0 → 0\.1.*allow_config_mismatch=True"
    ):
        load_checkpoint(fresh, tmp_path / "0003")
    assert load_checkpoint(fresh, tmp_path / "0003", allow_config_mismatch=True).step == 3
    assert fresh.optimizer.param_groups[0]["weight_decay"] == 0.1  # this run's settings win
    import shutil

    moved = build_components(shutil.copytree(tiny_model_dir, tmp_path / "moved-model"), LORA, device="cpu")
    with pytest.raises(CheckpointMismatchError, match="moved-model"):
        load_checkpoint(moved, tmp_path / "0003")
    assert load_checkpoint(moved, tmp_path / "0003", allow_config_mismatch=True).step == 3
    full = build_components(tiny_model_dir, FULL, device="cpu")
    with pytest.raises(CheckpointMismatchError, match="lora"):
        load_checkpoint(full, tmp_path / "0003", allow_config_mismatch=True)


def test_the_fingerprint_covers_what_a_checkpoint_means_and_not_how_steps_run() -> None:
    base = TrainerConfig()
    meaning: dict[str, Any] = {
        "betas": (0.8, 0.9),
        "eps": 1e-6,
        "weight_decay": 0.1,
        "max_grad_norm": None,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_targets": ("q_proj",),
        "quantization": "nf4",
    }
    run_only: dict[str, Any] = {
        "dtype": "float32",
        "max_sequence_length": 64,
        "micro_batch_rows": 1,
        "seed": 1,
        "activation_checkpointing": True,
        "memory_check": False,
    }
    assert set(meaning) | set(run_only) == {field.name for field in dataclasses.fields(TrainerConfig)}
    for name, value in meaning.items():
        assert dataclasses.replace(base, **{name: value}).fingerprint() != base.fingerprint(), name
    for name, value in run_only.items():  # the memory plan's advice must not break a resume
        assert dataclasses.replace(base, **{name: value}).fingerprint() == base.fingerprint(), name
    reordered = dataclasses.replace(base, lora_targets=tuple(reversed(base.lora_targets)))
    assert reordered.fingerprint() == base.fingerprint()  # targets are a set
    # unquantized, it is what checkpoints written before the static/per-call split hold
    assert base.fingerprint() == base.legacy_fingerprint()


def test_a_checkpoint_written_before_the_config_split_still_resumes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import json

    from art_local.training.state import LEGACY_FINGERPRINT_FIELDS

    components = build_components(tiny_model_dir, LORA, device="cpu")
    directory = tmp_path / "0002"
    save_checkpoint(components, TrainingState(step=2), directory)
    metadata = json.loads((directory / "metadata.json").read_text())
    legacy_fields = {name: metadata["fingerprint_fields"][name] for name in LEGACY_FINGERPRINT_FIELDS}
    config_then = {**metadata["config"], "learning_rate": 5e-6, "logprob_calculation_chunk_size": 1024}
    del metadata["fingerprint_version"]
    metadata.update(fingerprint="cb0cecbbce561976", fingerprint_fields=legacy_fields, config=config_then)
    (directory / "metadata.json").write_text(json.dumps(metadata))
    assert LORA.legacy_fingerprint() == "cb0cecbbce561976"  # what the older code wrote for these settings
    checkpointed = dataclasses.replace(LORA, activation_checkpointing=True)  # not hashed by the older code
    assert load_checkpoint(build_components(tiny_model_dir, checkpointed, device="cpu"), directory).step == 2
    other = build_components(tiny_model_dir, dataclasses.replace(LORA, weight_decay=0.1), device="cpu")
    with pytest.raises(CheckpointMismatchError, match=r"weight_decay: 0\.0 → 0\.1"):
        load_checkpoint(other, directory)


def test_load_weights_checks_keys(tiny_model_dir: Path) -> None:
    components = build_components(tiny_model_dir, LORA, device="cpu")
    weights = get_weights(components)
    changed = {key: value + 1.0 for key, value in weights.items()}
    load_weights(components, changed)
    assert all(torch.equal(get_weights(components)[k], changed[k]) for k in changed)
    with pytest.raises(ValueError, match="missing"):
        load_weights(components, dict(list(changed.items())[1:]))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="lora_rank"):
        TrainerConfig(lora_rank=0)
    with pytest.raises(ValueError, match="logprob_calculation_chunk_size"):
        StepConfig(logprob_calculation_chunk_size=0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="learning_rate"):
            StepConfig(learning_rate=bad)


@pytest.mark.gpu
def test_cuda_trains_in_bf16(tiny_model_dir: Path, batch: TrainBatch) -> None:
    components = build_components(tiny_model_dir, LORA, device="cuda")
    assert components.compute_dtype == torch.bfloat16
    metrics = forward_backward(components, batch)
    state = optim_step(components, TrainingState(), learning_rate=rate(LORA))
    assert state.step == 1 and torch.isfinite(torch.tensor(metrics["loss/train"]))
    assert all(p.dtype == torch.float32 for p in components.model.parameters() if p.requires_grad)

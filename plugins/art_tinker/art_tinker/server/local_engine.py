"""The loopback server's engine on art-local: its functional trainer for training, its KV-cache loop for sampling.

Each Tinker datum becomes one row of an art-local ``TrainBatch`` holding the full sequence
``model_input + [target_tokens[-1]]``; art-local computes the logprob of every token from its prefix, which is the
logprob of ``target_tokens[i]`` at input position ``i`` as long as the targets are the inputs shifted by one (the
layout every Tinker RL and SFT recipe uses). Other targets (distillation onto arbitrary ids) are refused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from art_tinker.server import batching, sampler
from art_tinker.server.engine import AdamSpec, ForwardBackwardResult, ModelLimits, SampleSpec, TrainerHandle
from art_tinker.server.errors import UserError
from art_tinker.server.losses import LOSSES, check_inputs, check_loss
from art_tinker.server.store import LoraSpec
from art_tinker.server.wire import DatumArrays, SampledSequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Module-name suffixes of a Llama-style decoder, per Tinker LoRA flag.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)


def lora_targets(lora: LoraSpec) -> list[str]:
    """The module names art-local should put LoRA adapters on for Tinker's train_mlp/attn/unembed flags."""
    targets = [*(MLP_MODULES if lora.train_mlp else ()), *(ATTENTION_MODULES if lora.train_attn else ())]
    return [*targets, *(UNEMBED_MODULES if lora.train_unembed else ())]


@dataclass
class LocalHandle(TrainerHandle):
    """A live training model: art-local's components (the mutable bundle), its state and config."""

    base_model: str
    components: Any  # art_local.training.TrainingComponents
    state: Any  # art_local.training.TrainingState
    config: Any  # art_local.training.TrainerConfig


class LocalEngine:
    """``Engine`` on art-local (CPU, or CUDA when present)."""

    def __init__(self, *, device: str | None = None, sampler_cache_size: int = 2) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}
        self._limits: dict[str, ModelLimits] = {}
        self._samplers: OrderedDict[tuple[str, str | None], PreTrainedModel] = OrderedDict()
        self._sampler_cache_size = sampler_cache_size

    # -- models and tokenizers ------------------------------------------------------------------------------

    def resolve_base_model(self, base_model: str) -> str:
        path = Path(base_model).expanduser()
        if (path / "config.json").is_file():
            return str(path)
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(base_model, local_files_only=True)
        except Exception:
            raise UserError(
                f"base_model {base_model[:200]!r} cannot be loaded by this server: it is neither a model directory "
                "nor in the local Hugging Face cache (this machine may have no hub access); pass a local directory, "
                "e.g. the one art_local.tiny.build_tiny_model() returns"
            ) from None
        return base_model

    def tokenizer(self, base_model: str) -> PreTrainedTokenizerBase:
        if base_model not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[base_model] = AutoTokenizer.from_pretrained(base_model)
        return self._tokenizers[base_model]

    def eos_token_ids(self, base_model: str) -> tuple[int, ...]:
        tokenizer = self.tokenizer(base_model)
        return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)

    def limits(self, base_model: str) -> ModelLimits:
        if base_model not in self._limits:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(base_model)
            text_config = getattr(config, "text_config", None) or config
            self._limits[base_model] = ModelLimits(
                vocab_size=int(text_config.vocab_size),
                context_length=int(getattr(text_config, "max_position_embeddings", 2048)),
                hidden_size=int(text_config.hidden_size),
            )
        return self._limits[base_model]

    # -- training -------------------------------------------------------------------------------------------

    def create(self, base_model: str, lora: LoraSpec) -> LocalHandle:
        from art_local import training

        targets = lora_targets(lora)
        config = training.TrainerConfig(
            lora_rank=lora.rank,
            lora_alpha=2 * lora.rank,  # scale 2, as art-local's default (rank 8, alpha 16)
            lora_targets=tuple(targets),
            seed=0 if lora.seed is None else lora.seed,
            max_sequence_length=1 << 30,
        )
        components = training.build_components(base_model, config, device=self.device, lora_targets=targets)
        return LocalHandle(base_model, components, training.TrainingState(), config)

    def forward_backward(
        self,
        handle: TrainerHandle,
        loss_fn: str,
        config: Mapping[str, float | str],
        data: Sequence[DatumArrays],
        *,
        forward_only: bool,
    ) -> ForwardBackwardResult:
        from art_local import training

        assert isinstance(handle, LocalHandle)
        check_loss(loss_fn, config)
        for index, datum in enumerate(data):
            check_inputs(loss_fn, index, set(datum.inputs))
        rows = batching.rows_for(data)
        batch = batching.train_batch(rows, self.device)
        loss_of = LOSSES[loss_fn]
        inputs = [batching.torch_inputs(datum, self.device) for datum in data]
        captured: list[torch.Tensor] = []

        def loss_on_rows(logprobs_BT: torch.Tensor, _batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
            per_datum = batching.per_datum_logprobs(logprobs_BT, rows)
            captured.extend(lp.detach() for lp in per_datum)
            losses = [loss_of(new_N, ins, config) for new_N, ins in zip(per_datum, inputs, strict=True)]
            return torch.stack(losses).sum(), {}

        if forward_only:
            with torch.no_grad():
                loss, _ = loss_on_rows(training.compute_logprobs(handle.components, batch), batch)
            total = float(loss)
        else:  # art-local backpropagates the returned loss; gradients accumulate until optim_step
            total = training.forward_backward_custom(handle.components, batch, loss_on_rows)["loss/train"]
        outputs = [{"logprobs": lp.float().cpu().numpy().astype(np.float32)} for lp in captured]
        return ForwardBackwardResult(outputs=outputs, metrics={"loss:sum": total})

    def optim_step(self, handle: TrainerHandle, adam: AdamSpec) -> Mapping[str, float]:
        from art_local import training

        assert isinstance(handle, LocalHandle)
        for (
            group
        ) in handle.components.optimizer.param_groups:  # Tinker sends AdamW's settings with every step
            group.update(betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay)
        handle.state = training.optim_step(
            handle.components,
            handle.state,
            learning_rate=adam.learning_rate,
            max_grad_norm=adam.grad_clip_norm if adam.grad_clip_norm > 0 else None,
        )
        return {"grad_norm:mean": handle.state.grad_norm, "learning_rate:mean": adam.learning_rate}

    def save(self, handle: TrainerHandle, directory: Path) -> None:
        from art_local import training

        assert isinstance(handle, LocalHandle)
        handle.state = training.save_checkpoint(handle.components, handle.state, directory)

    def load(self, handle: TrainerHandle, directory: Path, *, optimizer: bool) -> None:
        from art_local import training

        assert isinstance(handle, LocalHandle)
        if optimizer:
            handle.state = training.load_checkpoint(handle.components, directory, allow_config_mismatch=True)
            return
        from safetensors.torch import load_file

        adapter = load_file(str(directory / training.checkpoint.ADAPTER_FILE), device=str(self.device))
        training.load_weights(handle.components, adapter)
        handle.components.optimizer.state.clear()  # weights only: the optimizer starts afresh

    def release(self, handle: TrainerHandle) -> None:
        assert isinstance(handle, LocalHandle)
        handle.components = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- sampling -------------------------------------------------------------------------------------------

    def _sampler_model(self, base_model: str, weights: Path | None) -> PreTrainedModel:
        key = (base_model, None if weights is None else str(weights))
        if key in self._samplers:
            self._samplers.move_to_end(key)
            return self._samplers[key]
        from transformers import AutoModelForCausalLM

        loaded: Any = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        if weights is not None:
            from art_local import training

            loaded.load_state_dict(training.merged_state_dict_from_checkpoint(base_model, weights))
        model: PreTrainedModel = loaded.to(self.device).eval()
        self._samplers[key] = model
        while len(self._samplers) > self._sampler_cache_size:
            self._samplers.popitem(last=False)
        return model

    def sample(
        self,
        base_model: str,
        weights: Path | None,
        prompt: Sequence[int],
        num_samples: int,
        spec: SampleSpec,
        *,
        prompt_logprobs: bool,
    ) -> tuple[list[SampledSequence], list[float] | None]:
        if not prompt:
            raise UserError("the prompt is empty; sampling needs at least one token")
        model = self._sampler_model(base_model, weights)
        context = int(getattr(model.config, "max_position_embeddings", 2048))
        room = context - len(prompt)
        if room < 1:
            raise UserError(f"the prompt has {len(prompt)} tokens; this model's context is {context}")
        vocab = int(model.config.vocab_size)
        if any(not 0 <= token < vocab for token in prompt):
            raise UserError(f"the prompt holds token ids outside this model's vocabulary [0, {vocab})")
        max_new = min(spec.max_tokens or room, room)
        sequences = sampler.sample(model, self.tokenizer(base_model), prompt, num_samples, spec, max_new)
        return sequences, (sampler.prompt_logprobs(model, prompt) if prompt_logprobs else None)

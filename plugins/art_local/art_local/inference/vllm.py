"""The vLLM engine: vLLM's own OpenAI server as a subprocess (``vllm_process``), behind ours.

vLLM runs ``python -m vllm.entrypoints.openai.api_server`` with LoRA enabled, runtime adapter loading
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) and ``--return-tokens-as-token-ids``; its logprobs are the raw
(untempered) model logprobs (``--logprobs-mode raw_logprobs``, vLLM >= 0.10.2), like the transformers engine.
Each published step's peft adapter is hot-loaded as the LoRA ``{name}@{step}``; the base weights are served as
``{name}@{step}`` for a step without an adapter (step 0). Our server stays in front (chat template, tool-call
parsing, auth, ``name`` -> latest), and sends vLLM token-id prompts through ``/v1/completions``.
``LocalBackend(engine="vllm", vllm=VLLMEngineConfig(...))`` configures it (``vllm_config``).

This module never imports ``vllm``: it only launches it, so importing art_local stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from art_local.inference.engine import (
    Completion,
    FinishReason,
    SamplingParams,
    ServedModel,
    UnknownModelError,
    split_step_name,
)
from art_local.inference.vllm_config import VLLMEngineConfig
from art_local.inference.vllm_process import (
    BASE_ALIAS,
    VLLMExitedError,
    VLLMProcess,
    free_port,
    vllm_command,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BASE_ALIAS",
    "VLLMEngine",
    "VLLMEngineConfig",
    "VLLMExitedError",
    "VLLMProcess",
    "completion_request",
    "free_port",
    "parse_completion",
    "serve_kept_checkpoints",
    "vllm_command",
]


def completion_request(model: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> dict[str, Any]:
    """The body of vLLM's ``POST /v1/completions`` for a token-id prompt."""
    return {
        "model": model,
        "prompt": list(prompt_token_ids),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "n": params.n,
        "seed": params.seed,
        "stop": list(params.stop),
        "logprobs": params.top_logprobs,  # vLLM always adds the sampled token's own logprob
        "return_tokens_as_token_ids": True,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise RuntimeError(f"vLLM returned token {token!r}; it must run with --return-tokens-as-token-ids")
    return int(token.removeprefix("token_id:"))


def parse_completion(choice: Mapping[str, Any], top_k: int) -> Completion:
    """A ``Completion`` from one choice of vLLM's completions response (token ids from the logprobs)."""
    logprobs = choice.get("logprobs") or {}
    tokens = [_token_id(t) for t in logprobs.get("tokens") or []]
    values = [float(v) for v in logprobs.get("token_logprobs") or []]
    tops: tuple[tuple[tuple[int, float], ...], ...] = ()
    if top_k:
        ranked = [
            sorted(((_token_id(t), float(v)) for t, v in (d or {}).items()), key=lambda p: -p[1])
            for d in logprobs.get("top_logprobs") or []
        ]
        tops = tuple(tuple(r[:top_k]) for r in ranked)
    reason = choice.get("finish_reason")
    finish: FinishReason = "length" if reason == "length" else "stop"
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a completion with {reason!r}: {choice.get('stop_reason')!r}")
    return Completion(tuple(tokens), tuple(values), tops, str(choice.get("text") or ""), finish)


@dataclass
class _Served:
    base_model: str
    tokenizer: PreTrainedTokenizerBase
    context_length: int
    created: int
    latest: int
    vllm_names: dict[int, str] = field(default_factory=dict)  # step -> vLLM model name


class VLLMEngine:
    """Serves ``name`` and ``name@step`` through a vLLM subprocess, one LoRA adapter per published step."""

    def __init__(self, config: VLLMEngineConfig | None = None) -> None:
        self.config = config or VLLMEngineConfig()
        self._process: VLLMProcess | None = None
        self._served: dict[str, _Served] = {}
        self._lock = threading.RLock()  # resolve lists the served names while holding it
        self._start_lock = asyncio.Lock()

    async def _ensure_process(self, base_model: str) -> VLLMProcess:
        async with self._start_lock:
            if self._process is None:
                process = VLLMProcess(self.config, base_model)
                await process.start()
                self._process = process
            elif self._process.base_model != base_model:
                raise ValueError(
                    f"the vLLM engine already serves {self._process.base_model!r}; one base model per backend "
                    f"(got {base_model!r}); use another LocalBackend or engine='hf'"
                )
            return self._process

    async def add_model(
        self,
        name: str,
        *,
        base_model: str | Path,
        step: int,
        weights: Mapping[str, torch.Tensor] | None,
        load_step: Callable[[int], Mapping[str, torch.Tensor] | None],
        adapter_dir: Path | None = None,
    ) -> None:
        """Serve ``name`` at ``step``: the base weights, or the step's adapter (merged weights cannot hot-load)."""
        from transformers import AutoConfig, AutoTokenizer

        await self._ensure_process(str(base_model))
        with self._lock:
            existing = self._served.get(name)
        if existing is not None and existing.latest == step:
            return
        if existing is None:
            tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(base_model))
            model_config = await asyncio.to_thread(AutoConfig.from_pretrained, str(base_model))
            context = self.config.max_model_len or int(getattr(model_config, "max_position_embeddings", 2048))
            with self._lock:
                self._served[name] = _Served(str(base_model), tokenizer, context, int(time.time()), step)
                self._served[name].vllm_names[0] = BASE_ALIAS  # step 0 is the base weights, always at hand
        if weights is None:
            with self._lock:
                self._served[name].vllm_names[step] = BASE_ALIAS
                self._served[name].latest = step
            return
        if adapter_dir is None:
            raise ValueError(
                f"the vLLM engine serves trained steps as LoRA adapters, and step {step} of {name!r} came without "
                "one; keep LoRA training with save_checkpoint=True, or use engine='hf'"
            )
        await self.publish(name, step, weights, adapter_dir=adapter_dir)

    async def publish(
        self, name: str, step: int, weights: Mapping[str, torch.Tensor], *, adapter_dir: Path | None = None
    ) -> None:
        """Hot-load the step's adapter as ``{name}@{step}`` and make it the latest."""
        if adapter_dir is None:
            raise ValueError(
                f"publishing step {step} of {name!r} to vLLM needs the step's peft adapter directory; train with "
                "LoRA and save_checkpoint=True, or use engine='hf'"
            )
        await self._load_adapter(name, step, adapter_dir)
        with self._lock:
            self._served[name].latest = step

    async def serve_kept_steps(self, name: str, adapters: Mapping[int, Path]) -> None:
        """Serve older kept steps again (after a restart) as ``{name}@{step}``; the latest stays as it is."""
        for step, adapter_dir in sorted(adapters.items()):
            await self._load_adapter(name, step, adapter_dir)

    async def _load_adapter(self, name: str, step: int, adapter_dir: Path) -> None:
        lora_name = f"{name}@{step}"
        with self._lock:
            if self._served[name].vllm_names.get(step) == lora_name:
                return  # already loaded (vLLM answers 400 to a second load)
        body = {"lora_name": lora_name, "lora_path": str(adapter_dir)}
        await self._require_process().post("/v1/load_lora_adapter", body, timeout_s=600.0)
        with self._lock:
            self._served[name].vllm_names[step] = lora_name

    async def forget_steps(self, name: str, keep: Collection[int]) -> None:
        """Unload the adapters of steps not in ``keep`` (never the latest)."""
        process = self._require_process()
        with self._lock:
            served = self._served[name]
            gone = [s for s in served.vllm_names if s not in keep and s != served.latest]
            names = {s: served.vllm_names.pop(s) for s in gone}
        for vllm_name in names.values():
            if vllm_name != BASE_ALIAS:
                await process.post("/v1/unload_lora_adapter", {"lora_name": vllm_name})

    def _require_process(self) -> VLLMProcess:
        if self._process is None:
            raise RuntimeError("the vLLM engine has no model yet; call add_model first")
        return self._process

    def served_models(self) -> list[ServedModel]:
        """``name`` and ``name@step`` for every loaded step."""
        with self._lock:
            return [
                ServedModel(label, s.tokenizer, s.context_length, s.created)
                for name, s in self._served.items()
                for label in [name, *(f"{name}@{step}" for step in sorted(s.vllm_names))]
            ]

    def resolve(self, model: str) -> ServedModel:
        """Tokenizer and context length for ``model``."""
        name, step = split_step_name(model)
        with self._lock:
            served = self._served.get(name)
            if served is None or (step is not None and step not in served.vllm_names):
                raise UnknownModelError(model, [m.name for m in self.served_models()])
            return ServedModel(model, served.tokenizer, served.context_length, served.created)

    async def generate(
        self, model: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> list[Completion]:
        """``params.n`` completions from vLLM (its own continuous batching)."""
        name, step = split_step_name(model)
        with self._lock:
            served = self._served.get(name)
            vllm_name = (
                None if served is None else served.vllm_names.get(served.latest if step is None else step)
            )
        if vllm_name is None:
            raise UnknownModelError(model, [m.name for m in self.served_models()])
        # vLLM refuses n > 1 at temperature 0 (its greedy samples are identical): ask once, answer n times
        greedy_copies = params.n if params.temperature == 0 and params.n > 1 else 1
        asked = dataclasses.replace(params, n=1) if greedy_copies > 1 else params
        body = completion_request(vllm_name, prompt_token_ids, asked)
        answer = await self._require_process().post("/v1/completions", body)
        choices = sorted(cast(list[dict[str, Any]], answer["choices"]), key=lambda c: int(c["index"]))
        return [parse_completion(c, params.top_logprobs) for c in choices] * greedy_copies

    @property
    def process(self) -> VLLMProcess:
        """The running vLLM server (after the first ``add_model``)."""
        return self._require_process()

    @contextlib.asynccontextmanager
    async def asleep(self) -> AsyncIterator[None]:
        """vLLM sleeps (level 1) inside the block when ``sleep_during_train`` is set, and wakes after it."""
        process = self._process
        if process is None or not process.sleeps:
            yield
            return
        await process.sleep()
        try:
            yield
        finally:
            await process.wake_up()

    async def close(self) -> None:
        """Stop the vLLM subprocess."""
        process, self._process = self._process, None
        if process is not None:
            await process.stop()


async def serve_kept_checkpoints(engine: object, name: str, checkpoints: Path, latest: int) -> None:
    """After a restart: serve every kept LoRA checkpoint older than ``latest`` again as ``{name}@{step}``."""
    from art_local.training import checkpoint_steps

    if not isinstance(engine, VLLMEngine):
        return
    adapters = {
        step: checkpoints / f"{step:04d}"
        for step in checkpoint_steps(checkpoints)
        if 0 < step < latest and (checkpoints / f"{step:04d}" / "adapter_config.json").is_file()
    }
    await engine.serve_kept_steps(name, adapters)

"""The vLLM engine (GPU, extra ``art-local[vllm]``): vLLM's own OpenAI server as a subprocess, behind ours.

vLLM runs ``python -m vllm.entrypoints.openai.api_server`` with LoRA enabled, runtime adapter loading
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) and ``--return-tokens-as-token-ids``; its logprobs are the raw
(untempered) model logprobs (``--logprobs-mode raw_logprobs``, vLLM ≥ 0.10.2), like the transformers engine.
Each published step's peft adapter is hot-loaded as the LoRA ``{name}@{step}``; the base weights are served as
``{name}@{step}`` for a step without an adapter (step 0). Our server stays in front (chat template, tool-call
parsing, auth, ``name`` → latest), and sends vLLM token-id prompts through ``/v1/completions``.

This module never imports ``vllm``: it only launches it, so importing art_local stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx

from art_local.inference.engine import (
    Completion,
    FinishReason,
    SamplingParams,
    ServedModel,
    UnknownModelError,
    split_step_name,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

BASE_ALIAS = "art-base"  # vLLM's served name for the base weights


@dataclass(frozen=True)
class VLLMEngineConfig:
    """How the vLLM subprocess is launched."""

    start_timeout_s: float = 600.0
    request_timeout_s: float = 3600.0
    gpu_memory_utilization: float = 0.85
    max_loras: int = 4
    max_lora_rank: int = 64
    max_model_len: int | None = None
    python: str = sys.executable
    extra_args: tuple[str, ...] = ()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def vllm_command(config: VLLMEngineConfig, base_model: str, port: int, api_key: str) -> list[str]:
    """The command line of vLLM's OpenAI server for ``base_model``."""
    command = [
        config.python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", base_model,
        "--served-model-name", BASE_ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--api-key", api_key,
        "--enable-lora",
        "--max-loras", str(config.max_loras),
        "--max-lora-rank", str(config.max_lora_rank),
        "--return-tokens-as-token-ids",
        "--logprobs-mode", "raw_logprobs",
        "--max-logprobs", "20",
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
    ]  # fmt: skip
    if config.max_model_len is not None:
        command += ["--max-model-len", str(config.max_model_len)]
    return command + list(config.extra_args)


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


class VLLMProcess:
    """The vLLM server subprocess: start with a readiness timeout, log capture, and a clean stop."""

    def __init__(self, config: VLLMEngineConfig, base_model: str) -> None:
        self.config, self.base_model = config, base_model
        self.api_key = os.urandom(24).hex()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="art-vllm-", suffix=".log", delete=False)
        self._process: subprocess.Popen[bytes] | None = None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines vLLM printed."""
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def start(self) -> None:
        """Launch vLLM and wait for ``/health``; on failure the error carries vLLM's own output."""
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        command = vllm_command(self.config, self.base_model, self.port, self.api_key)
        self._process = subprocess.Popen(  # noqa: ASYNC220  # returns at once; we poll /health below
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + self.config.start_timeout_s
        async with httpx.AsyncClient(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    message = (
                        f"vLLM exited with code {self._process.returncode} while starting:\n{self.log_tail()}"
                    )
                    await self.stop()
                    raise RuntimeError(message)
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(1.0)
        message = (
            f"vLLM did not answer /health within {self.config.start_timeout_s:.0f} s:\n{self.log_tail()}"
        )
        await self.stop()
        raise RuntimeError(message)

    async def post(self, path: str, body: Mapping[str, Any], timeout_s: float = 120.0) -> Any:
        """POST to vLLM; a non-2xx answer raises with vLLM's error text."""
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(f"vLLM has exited (code {self._process.returncode}):\n{self.log_tail()}")
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.post(f"{self.url}{path}", json=dict(body), headers=headers)
        if response.status_code >= 400:
            raise RuntimeError(f"vLLM {path} answered {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content.strip().startswith(b"{") else response.text

    async def stop(self) -> None:
        """SIGTERM vLLM's process group (its engine workers too), SIGKILL after 30 s; remove the log."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 30.0)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait, 10.0)
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._log.name)


class VLLMEngine:
    """Serves ``name`` and ``name@step`` through a vLLM subprocess, one LoRA adapter per published step."""

    def __init__(self, config: VLLMEngineConfig | None = None) -> None:
        self.config = config or VLLMEngineConfig()
        self._process: VLLMProcess | None = None
        self._served: dict[str, _Served] = {}
        self._lock = threading.Lock()
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
        process = self._require_process()
        lora_name = f"{name}@{step}"
        await process.post("/v1/load_lora_adapter", {"lora_name": lora_name, "lora_path": str(adapter_dir)})
        with self._lock:
            served = self._served[name]
            served.vllm_names[step] = lora_name
            served.latest = step

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
        body = completion_request(vllm_name, prompt_token_ids, params)
        answer = await self._require_process().post(
            "/v1/completions", body, timeout_s=self.config.request_timeout_s
        )
        choices = sorted(cast(list[dict[str, Any]], answer["choices"]), key=lambda c: int(c["index"]))
        return [parse_completion(c, params.top_logprobs) for c in choices]

    async def close(self) -> None:
        """Stop the vLLM subprocess."""
        process, self._process = self._process, None
        if process is not None:
            await process.stop()

"""InferenceService: the engines and the OpenAI-compatible HTTP server for every model of one LocalBackend.

``LocalBackend`` creates one lazily, ``add_model``s each registered model, ``publish``es the merged weights
after every ``train()``, ``forget_steps`` when checkpoints are deleted and ``close``s it with the backend.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from art_local.inference.engine import Completion, SamplingParams, ServedModel
from art_local.inference.server import DEFAULT_MAX_BODY_BYTES, InferenceServer, create_app
from art_local.inference.vllm_config import EngineKind, VLLMEngineConfig, choose_engine

if TYPE_CHECKING:
    import torch

__all__ = ["EngineKind", "HostedEngine", "InferenceService", "choose_engine"]


class HostedEngine(Protocol):
    """An ``Engine`` whose models the service manages (what HFEngine and VLLMEngine both provide)."""

    def served_models(self) -> list[ServedModel]: ...

    def resolve(self, model: str) -> ServedModel: ...

    async def generate(
        self, model: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> list[Completion]: ...

    async def add_model(
        self,
        name: str,
        *,
        base_model: str | Path,
        step: int,
        weights: Mapping[str, torch.Tensor] | None,
        load_step: Callable[[int], Mapping[str, torch.Tensor] | None],
        adapter_dir: Path | None = None,
    ) -> None: ...

    async def publish(
        self, name: str, step: int, weights: Mapping[str, torch.Tensor], *, adapter_dir: Path | None = None
    ) -> None: ...

    async def forget_steps(self, name: str, keep: Collection[int]) -> None: ...

    async def close(self) -> None: ...


class InferenceService:
    """Engines + the OpenAI-compatible HTTP server for every model of one LocalBackend."""

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        engine: EngineKind = "auto",
        api_key: str | None = None,
        batch_window_s: float = 0.005,
        cpu_threads: int | None = None,
        dtype: torch.dtype | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        start_timeout_s: float = 600.0,
        vllm: VLLMEngineConfig | None = None,
    ) -> None:
        self._device = None if device is None else str(device)
        self._host, self._port = host, port
        self._vllm = vllm if vllm is not None else VLLMEngineConfig(start_timeout_s=start_timeout_s)
        self._engine_kind = choose_engine(engine, self._vllm)
        self._api_key = api_key or secrets.token_urlsafe(32)
        self._batch_window_s = batch_window_s
        self._cpu_threads = cpu_threads
        self._dtype = dtype  # the transformers engine's; None: its own default (HFEngineConfig)
        self._max_body_bytes = max_body_bytes
        self._engine: HostedEngine | None = None
        self._server: InferenceServer | None = None
        self._start_lock = asyncio.Lock()

    @property
    def engine_kind(self) -> Literal["hf", "vllm"]:
        """Which engine serves the models."""
        return self._engine_kind

    @property
    def api_key(self) -> str:
        """The key every request must send as ``Authorization: Bearer <key>``."""
        return self._api_key

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (valid after ``start``)."""
        if self._server is None:
            raise RuntimeError("the inference service has not started; await service.start() first")
        return self._server.base_url

    @property
    def engine(self) -> HostedEngine:
        """The engine behind the server (valid after ``start``)."""
        if self._engine is None:
            raise RuntimeError("the inference service has not started; await service.start() first")
        return self._engine

    def health_problem(self) -> str | None:
        """None while the engine works (or has not started), else why it cannot answer (``/health`` says 503)."""
        try:
            self.check_healthy()
        except Exception as exc:
            return str(exc)
        return None

    def check_healthy(self) -> None:
        """Raise the engine's failure (a dead or stalled worker, a crashed vLLM) so callers fail, not hang."""
        check = getattr(self._engine, "check_healthy", None)  # engines without a watchdog have nothing to say
        if check is not None:
            check()

    def _make_engine(self) -> HostedEngine:
        if self._engine_kind == "vllm":
            from art_local.inference.vllm import VLLMEngine

            return VLLMEngine(self._vllm)
        from art_local.inference.hf import HFEngine, HFEngineConfig

        return HFEngine(
            HFEngineConfig(
                device=self._device,
                dtype=self._dtype,
                batch_window_s=self._batch_window_s,
                cpu_threads=self._cpu_threads,
            )
        )

    async def start(self) -> None:
        """Create the engine and start the HTTP server (idempotent; fails with the server's own error text)."""
        async with self._start_lock:
            if self._server is not None:
                return
            engine = self._make_engine()
            app = create_app(
                engine, api_key=self._api_key, max_body_bytes=self._max_body_bytes, health=self.health_problem
            )
            server = InferenceServer(app, host=self._host, port=self._port)
            try:
                await server.start(timeout_s=60.0)
            except BaseException:
                await engine.close()
                raise
            self._engine, self._server = engine, server

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
        """Serve ``name`` (latest) and ``name@{step}``; registering the same name again is a no-op.

        ``weights`` is the merged state dict of ``step`` (None: the base weights); ``load_step(s)`` gives the
        merged weights of an older kept step on demand (None when it was not kept; step 0 falls back to the
        base weights); ``adapter_dir`` is the step's peft adapter directory when one was saved (vLLM needs it).
        """
        await self.start()
        await self.engine.add_model(
            name,
            base_model=base_model,
            step=step,
            weights=weights,
            load_step=load_step,
            adapter_dir=adapter_dir,
        )

    async def publish(
        self, name: str, step: int, weights: Mapping[str, torch.Tensor], *, adapter_dir: Path | None = None
    ) -> None:
        """After train(): ``name`` and ``name@{step}`` answer with these weights; in-flight requests finish as they began."""
        await self.engine.publish(name, step, weights, adapter_dir=adapter_dir)

    async def forget_steps(self, name: str, keep: Collection[int]) -> None:
        """Stop serving ``name@{s}`` for steps not in ``keep``."""
        await self.engine.forget_steps(name, keep)

    async def close(self) -> None:
        """Stop the server (freeing the port) and the engine; idempotent (``start`` may run again later)."""
        async with self._start_lock:
            server, engine = self._server, self._engine
            self._server = self._engine = None
            if server is not None:
                await server.stop()
            if engine is not None:
                await engine.close()

"""The loopback server's state and route logic: sessions, training models, samplers, futures, checkpoints.

HTTP-free: ``app`` parses requests into the SDK's own types and calls these methods. Addressing errors (unknown
session, model, sampler, checkpoint; malformed values) raise ``UserError``/``NotFound`` at once so the SDK fails
fast; failures while a request runs become failed futures (category ``user`` for bad input, ``server`` else).
"""

# size: one method per SDK route over one shared state (sessions, models, samplers, futures); each is short,
# and splitting the class by route would scatter the locking that keeps that state consistent.

from __future__ import annotations

import asyncio
import functools
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tinker import types

from art_tinker.server.checks import (
    check_data,
    check_optimizer,
    check_prompt,
    check_sample_request,
    lora_spec,
    sample_spec,
)
from art_tinker.server.engine import AdamSpec, Engine, TrainerHandle
from art_tinker.server.errors import Gone, NotFound, UserError
from art_tinker.server.futures import Failure, FutureTable, JsonResult, Outcome, ProtoResult, SeqGate
from art_tinker.server.losses import check_loss
from art_tinker.server.store import (
    CheckpointRef,
    CheckpointStore,
    LoraSpec,
    RunInfo,
    check_model_id,
    check_name,
    parse_tinker_path,
)
from art_tinker.server.wire import ForwardBackwardCall, encode_forward_backward_output, encode_sample_response

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Session:
    session_id: str
    last_seen: float = field(default_factory=time.monotonic)
    finished: bool = False
    model_ids: set[str] = field(default_factory=set)
    sampler_ids: set[str] = field(default_factory=set)
    ephemeral_dirs: list[Path] = field(default_factory=list)


@dataclass
class LiveModel:
    run: RunInfo
    session_id: str
    create_request_id: str = ""
    gate: SeqGate = field(default_factory=SeqGate)
    requests_by_seq: dict[int, str] = field(default_factory=dict)
    handle: TrainerHandle | None = None


@dataclass(frozen=True)
class Sampler:
    sampler_id: str
    base_model: str
    model_path: str | None
    weights: Path | None


class TinkerService:
    """Everything the 19 routes do, over one ``Engine`` and one ``CheckpointStore``."""

    def __init__(
        self,
        engine: Engine,
        store: CheckpointStore,
        *,
        long_poll_s: float = 20.0,
        gap_wait_s: float = 2.0,
        session_timeout_s: float = 900.0,
    ) -> None:
        self.engine = engine
        self.store = store
        self.long_poll_s = long_poll_s
        self.gap_wait_s = gap_wait_s
        self.session_timeout_s = session_timeout_s
        self.futures = FutureTable()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, LiveModel] = {}
        self.samplers: dict[str, Sampler] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinker-engine")

    async def compute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run engine work on the single engine thread (one computation at a time)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # -- sessions -------------------------------------------------------------------------------------------

    def create_session(self, request: types.CreateSessionRequest) -> dict[str, Any]:
        session = Session(session_id=uuid.uuid4().hex)
        self.sessions[session.session_id] = session
        return {"type": "create_session", "session_id": session.session_id}

    def session(self, session_id: str) -> Session:
        """A live session (touching its heartbeat clock), or NotFound / Gone."""
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(
                f"session {session_id[:100]!r} is unknown to this server; create a new ServiceClient"
            )
        if session.finished:
            raise Gone(f"session {session_id!r} was finished; create a new ServiceClient")
        session.last_seen = time.monotonic()
        return session

    def heartbeat(self, session_id: str) -> dict[str, Any]:
        self.session(session_id)
        return {"type": "session_heartbeat"}

    async def finish_session(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"session {session_id[:100]!r} is unknown to this server")
        if session.finished:
            return
        session.finished = True
        for model_id in list(session.model_ids):
            model = self.models.pop(model_id, None)
            if model is not None and model.handle is not None:
                await self.compute(self.engine.release, model.handle)
        for sampler_id in session.sampler_ids:
            self.samplers.pop(sampler_id, None)
        for directory in session.ephemeral_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    async def housekeeping(self) -> None:
        """Finish sessions whose heartbeat stopped; forget old futures."""
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if not session.finished and now - session.last_seen > self.session_timeout_s:
                logger.info("session %s missed its heartbeats; finishing it", session.session_id)
                await self.finish_session(session.session_id)
        self.futures.prune()

    async def close(self) -> None:
        await self.futures.drain()
        for session_id in list(self.sessions):
            await self.finish_session(session_id)
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- training models ------------------------------------------------------------------------------------

    def model(self, model_id: str) -> LiveModel:
        """A live training model, or NotFound naming it (fast: the SDK must not retry an unknown id)."""
        model = self.models.get(model_id)
        if model is None:
            raise NotFound(
                f"model_id {model_id[:100]!r} is unknown on this server (never created, or its session finished); "
                "create a training client with ServiceClient.create_lora_training_client"
            )
        self.session(model.session_id)
        return model

    def _ordered(self, model: LiveModel, seq_id: int | None, kind: str, work: Callable[[], Any]) -> str:
        """Submit ``work`` in ``seq_id`` order; a repeated ``seq_id`` (HTTP retry) returns the first request."""
        if seq_id is None:
            raise UserError(f"{kind} needs a seq_id")
        if seq_id in model.requests_by_seq:
            return model.requests_by_seq[seq_id]
        request_id = self.futures.submit(kind, model.gate.run(seq_id, work()))
        model.requests_by_seq[seq_id] = request_id
        for old in [s for s in model.requests_by_seq if s < seq_id - 512]:
            del model.requests_by_seq[old]
        return request_id

    def _new_model(self, session: Session, model_seq_id: int, base_model: str, lora: LoraSpec) -> LiveModel:
        model_id = check_model_id(f"{session.session_id}:train:{model_seq_id}")
        run = RunInfo(model_id, base_model, lora, datetime.now(UTC).isoformat())
        self.store.write_run(run)
        model = LiveModel(run=run, session_id=session.session_id, gate=SeqGate(gap_wait_s=self.gap_wait_s))
        self.models[model_id] = model
        session.model_ids.add(model_id)
        return model

    def create_model(self, request: types.CreateModelRequest) -> dict[str, Any]:
        session = self.session(request.session_id)
        existing = self.models.get(f"{session.session_id}:train:{request.model_seq_id}")
        if existing is not None:
            return {"request_id": existing.create_request_id, "model_id": existing.run.model_id}
        check_optimizer(request.optimizer_config)
        self.engine.resolve_base_model(request.base_model)
        spec = lora_spec(request.lora_config, self.engine.limits(request.base_model))
        model = self._new_model(session, request.model_seq_id, request.base_model, spec)

        async def create() -> Outcome:
            model.handle = await self.compute(self.engine.create, model.run.base_model, model.run.lora)
            return JsonResult({"model_id": model.run.model_id, "type": "create_model"})

        model.create_request_id = self.futures.submit("create_model", model.gate.run(0, create()))
        return {"request_id": model.create_request_id, "model_id": model.run.model_id}

    def get_info(self, request: types.GetInfoRequest) -> dict[str, Any]:
        run = self.model(request.model_id).run
        return {
            "type": "get_info",
            "model_id": run.model_id,
            "model_data": {"model_name": run.base_model, "tokenizer_id": run.base_model, "arch": None},
            "is_lora": True,
            "lora_rank": run.lora.rank,
            "model_name": run.base_model,
        }

    @staticmethod
    def _handle(model: LiveModel) -> TrainerHandle:
        if model.handle is None:
            raise UserError(f"model {model.run.model_id} failed to be created; create a new training client")
        return model.handle

    def forward_backward(self, call: ForwardBackwardCall) -> dict[str, Any]:
        model = self.model(call.model_id)
        check_loss(call.loss_fn, call.loss_fn_config)
        check_data(call.data, self.engine.limits(model.run.base_model))

        async def run() -> Outcome:
            result = await self.compute(
                self.engine.forward_backward,
                self._handle(model),
                call.loss_fn,
                call.loss_fn_config,
                call.data,
                forward_only=call.forward_only,
            )
            return ProtoResult(encode_forward_backward_output(result.outputs, result.metrics))

        kind = "forward" if call.forward_only else "forward_backward"
        return {"request_id": self._ordered(model, call.seq_id, kind, run), "model_id": call.model_id}

    def optim_step(self, request: types.OptimStepRequest) -> dict[str, Any]:
        model = self.model(request.model_id)
        params = request.optim_params

        async def run() -> Outcome:
            if not isinstance(params, types.AdamParams):
                raise UserError(f"optim_step got {type(params).__name__}; this server's models use AdamW")
            values = params.model_dump()
            bad = {k: v for k, v in values.items() if not math.isfinite(v) or v < 0}
            if bad:
                raise UserError(f"AdamParams {bad} must be finite and >= 0")
            metrics = await self.compute(self.engine.optim_step, self._handle(model), AdamSpec(**values))
            return JsonResult({"metrics": dict(metrics), "type": "optim_step"})

        return {
            "request_id": self._ordered(model, request.seq_id, "optim_step", run),
            "model_id": request.model_id,
        }

    def _save(
        self, model: LiveModel, ref: CheckpointRef, overwrite: bool, metadata: dict[str, str] | None
    ) -> Any:
        async def save() -> None:
            with self.store.writing(ref, model.run, overwrite=overwrite, user_metadata=metadata) as tmp:
                await self.compute(self.engine.save, self._handle(model), tmp)

        return save()

    def save_weights(self, request: types.SaveWeightsRequest) -> dict[str, Any]:
        model = self.model(request.model_id)

        async def run() -> Outcome:
            ref = CheckpointRef(
                model.run.model_id, "weights", check_name(request.path or f"seq-{request.seq_id}")
            )
            await self._save(model, ref, request.overwrite, request.user_metadata)
            return JsonResult({"path": ref.tinker_path, "type": "save_weights"})

        return {
            "request_id": self._ordered(model, request.seq_id, "save_weights", run),
            "model_id": request.model_id,
        }

    def save_weights_for_sampler(self, request: types.SaveWeightsForSamplerRequest) -> dict[str, Any]:
        model = self.model(request.model_id)
        session = self.session(model.session_id)

        async def run() -> Outcome:
            if request.path is not None:
                ref = CheckpointRef(model.run.model_id, "sampler_weights", check_name(request.path))
                await self._save(model, ref, True, request.user_metadata)
                return JsonResult({"path": ref.tinker_path, "type": "save_weights_for_sampler"})
            directory = self.store.ephemeral_dir()
            session.ephemeral_dirs.append(directory)
            await self.compute(self.engine.save, self._handle(model), directory)
            sampler_id = f"{session.session_id}:sample:{request.sampling_session_seq_id}"
            self.samplers[sampler_id] = Sampler(sampler_id, model.run.base_model, None, directory)
            session.sampler_ids.add(sampler_id)
            return JsonResult({"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})

        request_id = self._ordered(model, request.seq_id, "save_weights_for_sampler", run)
        return {"request_id": request_id, "model_id": request.model_id}

    def _training_checkpoint(self, path: str) -> tuple[CheckpointRef, Path]:
        ref = parse_tinker_path(path)
        if ref.kind != "weights":
            raise UserError(
                f"{path} holds sampler weights; load_weights needs tinker://<model_id>/weights/<name>"
            )
        return ref, self.store.existing(ref)

    def load_weights(self, request: types.LoadWeightsRequest) -> dict[str, Any]:
        check_optimizer(request.optimizer_config)
        ref, directory = self._training_checkpoint(request.path)
        if request.model_id is not None:
            model = self.model(request.model_id)

            async def load_into() -> Outcome:
                await self.compute(
                    self.engine.load, self._handle(model), directory, optimizer=request.optimizer
                )
                return JsonResult(
                    {"path": request.path, "model_id": model.run.model_id, "type": "load_weights"}
                )

            return {
                "request_id": self._ordered(model, request.seq_id, "load_weights", load_into),
                **_mid(model),
            }
        if request.session_id is None or request.model_seq_id is None:
            raise UserError("load_weights needs either model_id and seq_id, or session_id and model_seq_id")
        session = self.session(request.session_id)
        existing = self.models.get(f"{session.session_id}:train:{request.model_seq_id}")
        if existing is not None:
            return {"request_id": existing.create_request_id, **_mid(existing)}
        meta = self.store.read_meta(ref)
        base_model = request.base_model or meta["base_model"]
        self.engine.resolve_base_model(base_model)
        model = self._new_model(session, request.model_seq_id, base_model, LoraSpec(**meta["lora"]))

        async def create_from() -> Outcome:
            model.handle = await self.compute(self.engine.create, base_model, model.run.lora)
            await self.compute(self.engine.load, model.handle, directory, optimizer=request.optimizer)
            return JsonResult({"path": request.path, "model_id": model.run.model_id, "type": "load_weights"})

        model.create_request_id = self.futures.submit("load_weights", model.gate.run(0, create_from()))
        return {"request_id": model.create_request_id, **_mid(model)}

    # -- sampling -------------------------------------------------------------------------------------------

    def _resolve_sampler(self, sampler_id: str, base_model: str | None, model_path: str | None) -> Sampler:
        if model_path:
            ref = parse_tinker_path(model_path)
            directory = self.store.existing(ref)
            return Sampler(
                sampler_id, base_model or self.store.read_meta(ref)["base_model"], model_path, directory
            )
        if not base_model:
            raise UserError("a sampler needs a model_path (tinker://...) or a base_model")
        self.engine.resolve_base_model(base_model)
        return Sampler(sampler_id, base_model, None, None)

    def create_sampling_session(self, request: types.CreateSamplingSessionRequest) -> dict[str, Any]:
        session = self.session(request.session_id)
        sampler_id = f"{session.session_id}:sample:{request.sampling_session_seq_id}"
        if sampler_id not in self.samplers:
            self.samplers[sampler_id] = self._resolve_sampler(
                sampler_id, request.base_model, request.model_path
            )
            session.sampler_ids.add(sampler_id)
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    def get_sampler(self, sampler_id: str) -> dict[str, Any]:
        sampler = self.samplers.get(sampler_id)
        if sampler is None:
            raise NotFound(f"sampler {sampler_id[:100]!r} is unknown on this server")
        return {
            "sampler_id": sampler.sampler_id,
            "base_model": sampler.base_model,
            "model_path": sampler.model_path,
        }

    def asample(self, request: types.SampleRequest) -> dict[str, Any]:
        if request.sampling_session_id:
            sampler = self.samplers.get(request.sampling_session_id)
            if sampler is None:
                raise NotFound(
                    f"sampling_session_id {request.sampling_session_id[:100]!r} is unknown on this server"
                )
        else:
            sampler = self._resolve_sampler("adhoc", request.base_model, request.model_path)
        check_sample_request(request)
        try:
            prompt = request.prompt.to_ints()
        except ValueError as error:
            raise UserError(f"prompt: {error}") from None
        check_prompt(prompt, self.engine.limits(sampler.base_model))  # a 400 now, not a failed future later
        spec = sample_spec(request.sampling_params, self.engine.eos_token_ids(sampler.base_model))
        want_prompt_logprobs = bool(request.prompt_logprobs)
        last_n = request.prompt_logprobs_last_n

        async def run() -> Outcome:
            sequences, prompt_lps = await self.compute(
                self.engine.sample,
                sampler.base_model,
                sampler.weights,
                prompt,
                request.num_samples,
                spec,
                prompt_logprobs=want_prompt_logprobs,
            )
            if prompt_lps is not None and last_n is not None:
                prompt_lps = [math.nan] * (len(prompt_lps) - last_n) + prompt_lps[-last_n:]
            return ProtoResult(encode_sample_response(sequences, prompt_lps))

        request_id = self.futures.submit("sample", run())
        return {
            "request_id": request_id,
            "sample_sequence_ids": [f"{request_id}:{i}" for i in range(request.num_samples)],
        }

    # -- futures and checkpoints ----------------------------------------------------------------------------

    async def retrieve(self, request_id: str) -> Outcome | None:
        """The request's outcome, or None while it runs (after long-polling ``long_poll_s``)."""
        return await self.futures.wait(request_id, self.long_poll_s)

    def list_checkpoints(self, model_id: str) -> dict[str, Any]:
        return {"checkpoints": self.store.list(check_model_id(model_id)), "cursor": None}

    def delete_checkpoint(self, model_id: str, checkpoint_id: str) -> None:
        kind, _, name = checkpoint_id.partition("/")
        ref = parse_tinker_path(f"tinker://{check_model_id(model_id)}/{kind}/{name}")
        self.store.delete(ref)


def _mid(model: LiveModel) -> dict[str, str]:
    return {"model_id": model.run.model_id}


__all__ = ["Failure", "TinkerService"]

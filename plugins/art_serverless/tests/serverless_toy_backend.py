"""TEST FIXTURE, not shipped: a small real backend for exercising the server without torch.

It really computes art_core's advantages and batch normalisation, persists its steps on disk (so a restarted
server sees them), serves a real OpenAI-shaped chat endpoint over HTTP (an echo that names the model it was
asked for), and misbehaves on demand through group metadata:
``fail`` (raise with that message), ``sleep_s`` (take that long), ``started_marker`` (touch that file when
train starts), ``gradient_steps`` (report that many optimizer steps).
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

import art_core
from art_core.advantages import batch_advantages, is_trainable_group, normalize_batch
from art_core.backend import ImportanceSamplingLevel
from art_core.model import Model, TrainableModel
from art_core.plugin_api import KEEP_ALIVE_S, bind_socket
from art_core.results import TrainResult
from art_core.trajectories import TrajectoryGroup, check_groups


def _steps_file(model: Model) -> Path:
    return model.output_dir() / "toy_steps.json"


def read_steps(model: Model) -> list[int]:
    path = _steps_file(model)
    return json.loads(path.read_text()) if path.exists() else []


def _write_steps(model: Model, steps: list[int]) -> None:
    path = _steps_file(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(sorted(steps)))
    temporary.replace(path)


def echo_app(api_key: str, known: Callable[[str], bool], seen: list[dict[str, Any]]) -> FastAPI:
    """A real OpenAI-shaped endpoint: answers 'echo <model>: <last user message>', streamed or not."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        seen.append(body)
        model = body["model"]
        if not known(model):
            return JSONResponse(
                {"error": {"message": f"unknown model {model}", "type": "not_found"}}, status_code=404
            )
        text = f"echo {model}: {body['messages'][-1]['content']}"
        if body.get("stream"):

            async def events() -> Any:
                for piece in (text[:5], text[5:]):
                    chunk = {
                        "id": "c1",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": model,
                        "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    return app


class ToyBackend:
    """A real, small TrainableBackend (see the module docstring). TEST FIXTURE."""

    def __init__(self) -> None:
        self.api_key = "toy-" + secrets.token_hex(8)
        self.models: dict[str, TrainableModel] = {}
        self.concurrent: dict[str, int] = {}
        self.max_concurrent: dict[str, int] = {}
        self.train_calls: list[dict[str, Any]] = []
        self.deletions: list[tuple[str, list[int]]] = []
        self.chat_requests: list[dict[str, Any]] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None

    async def register(self, model: Model) -> None:
        assert isinstance(model, TrainableModel)
        self.models[model.name] = model

    def _known(self, name: str) -> bool:
        base, _, step = name.partition("@")
        model = self.models.get(base)
        return model is not None and (not step or int(step) == 0 or int(step) in read_steps(model))

    async def _prepare_backend_for_training(self, model: TrainableModel) -> tuple[str, str]:
        if self._base_url is None:
            sock = bind_socket("127.0.0.1", 0)
            port = sock.getsockname()[1]
            config = uvicorn.Config(
                echo_app(self.api_key, self._known, self.chat_requests),
                log_level="warning",
                timeout_keep_alive=KEEP_ALIVE_S,
            )
            self._server = uvicorn.Server(config)
            self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 10
            while not self._server.started and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            self._base_url = f"http://127.0.0.1:{port}/v1"
        return self._base_url, self.api_key

    def _model_inference_name(self, model: Model, step: int | None = None) -> str:
        return model.name if step is None else f"{model.name}@{step}"

    async def _get_step(self, model: TrainableModel) -> int:
        return max(read_steps(model), default=0)

    async def _delete_checkpoint_files(self, model: TrainableModel, steps_to_keep: list[int]) -> None:
        self.deletions.append((model.name, sorted(steps_to_keep)))
        _write_steps(model, [step for step in read_steps(model) if step in steps_to_keep])

    async def close(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            await asyncio.to_thread(self._thread.join, 10)

    async def train(
        self,
        model: TrainableModel,
        trajectory_groups: Iterable[TrajectoryGroup],
        /,
        *,
        learning_rate: float = 5e-6,
        ppo: bool = False,
        epsilon: float | None = None,
        epsilon_high: float | None = None,
        advantage_balance: float = 0.0,
        scale_rewards: bool = True,
        importance_sampling_level: ImportanceSamplingLevel = "token",
        max_negative_advantage_importance_sampling_weight: float | None = None,
        mask_prob_ratio: bool = False,
        kimi_k2_tau: float | None = None,
        precalculate_logprobs: bool = False,
    ) -> TrainResult:
        groups = check_groups(trajectory_groups)
        options = {
            "learning_rate": learning_rate,
            "ppo": ppo,
            "epsilon": epsilon,
            "epsilon_high": epsilon_high,
            "advantage_balance": advantage_balance,
            "scale_rewards": scale_rewards,
            "importance_sampling_level": importance_sampling_level,
            "max_negative_advantage_importance_sampling_weight": max_negative_advantage_importance_sampling_weight,
            "mask_prob_ratio": mask_prob_ratio,
            "kimi_k2_tau": kimi_k2_tau,
            "precalculate_logprobs": precalculate_logprobs,
        }
        self.train_calls.append({"model": model.name, **options})
        self.concurrent[model.name] = self.concurrent.get(model.name, 0) + 1
        self.max_concurrent[model.name] = max(
            self.max_concurrent.get(model.name, 0), self.concurrent[model.name]
        )
        try:
            return await self._train(model, groups, learning_rate, scale_rewards, advantage_balance)
        finally:
            self.concurrent[model.name] -= 1

    async def _train(
        self,
        model: TrainableModel,
        groups: list[TrajectoryGroup],
        learning_rate: float,
        scale_rewards: bool,
        advantage_balance: float,
    ) -> TrainResult:
        meta: dict[str, Any] = {}
        for group in groups:
            meta.update(group.metadata)
        if "started_marker" in meta:
            Path(str(meta["started_marker"])).write_text("started")
        if "sleep_s" in meta:
            await asyncio.sleep(float(meta["sleep_s"]))
        if "fail" in meta:
            raise RuntimeError(str(meta["fail"]))
        advantages = [
            a
            for group_advs in batch_advantages(groups, scale_rewards=scale_rewards)
            for a in group_advs
            if a != 0
        ]
        batch = normalize_batch(advantages, [1] * len(advantages), advantage_balance=advantage_balance)
        loss = -math.fsum(a * w for a, w in zip(batch.advantages, batch.token_weights, strict=True)) / max(
            len(advantages), 1
        )
        step = max(read_steps(model), default=0) + 1
        _write_steps(model, [*read_steps(model), step])
        return TrainResult(
            step=step,
            metrics={
                "loss/train": loss,
                "loss/learning_rate": learning_rate,
                "toy/sum_abs_advantage": math.fsum(abs(a) for a in batch.advantages),
                "data/step_num_groups_trainable": float(
                    sum(is_trainable_group([t.reward for t in g]) for g in groups)
                ),
                "data/step_num_gradient_steps": float(meta.get("gradient_steps", 1)),
            },
        )


class ToyPlugin:
    """Registers ``toy`` → ToyBackend (for the subprocess server)."""

    @staticmethod
    @art_core.hookimpl
    def art_register_backends(register: Callable[[str, type[Any]], None]) -> None:
        register("toy", ToyBackend)

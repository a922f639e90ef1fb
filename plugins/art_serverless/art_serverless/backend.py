"""``ServerlessBackend``: train through the serverless-RL HTTP API (W&B Training, or ``art serverless serve``)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import warnings
from collections.abc import Iterable
from typing import Any

import httpx
from tqdm.auto import tqdm

from art_core.model import Model, TrainableModel
from art_core.plugin_api import ImportanceSamplingLevel, TrainOptions, check_flag, check_groups, check_number
from art_core.results import ServerlessTrainResult
from art_core.sft import AssistantTurns, LearningRateSchedule, SFTOptions, sft_conversations
from art_core.trajectories import Trajectory, TrajectoryGroup
from art_serverless import wire
from art_serverless.metrics import step_metrics, train_metrics
from art_serverless.transport import ApiClient, RetryPolicy, ServerlessAPIError


class TrainingJobFailedError(RuntimeError):
    """The server reported ``training_failed``; ``message`` is its error text."""

    def __init__(self, job_id: str, message: str) -> None:
        self.job_id = job_id
        self.message = message
        super().__init__(f"training job {job_id} failed on the server: {message}")


class TrainingStalledError(TimeoutError):
    """No new event arrived for ``timeout`` seconds (server gone, or the job stuck)."""

    def __init__(self, job_id: str, timeout: float, last_error: BaseException | None) -> None:
        self.job_id = job_id
        self.timeout = timeout
        cause = (
            f"; last polling error: {type(last_error).__name__}: {last_error}"
            if last_error is not None
            else ""
        )
        super().__init__(
            f"training job {job_id} made no progress for {timeout:g} s (no_progress_timeout){cause}; the job may "
            "still finish on the server: check its events, or raise no_progress_timeout for slow jobs"
        )


def experimental_config(
    common: TrainOptions,
    *,
    max_negative_advantage_importance_sampling_weight: float | None,
    mask_prob_ratio: bool,
    kimi_k2_tau: float | None,
    precalculate_logprobs: bool,
) -> dict[str, Any]:
    """The ``experimental_config`` body of a job: the checked common options, then the serverless ones, each
    checked here too (nothing is sent when one is bad)."""
    check_number(
        "max_negative_advantage_importance_sampling_weight",
        max_negative_advantage_importance_sampling_weight,
        above=0.0,
        allow_none=True,
    )
    check_number("kimi_k2_tau", kimi_k2_tau, allow_none=True)
    config: dict[str, Any] = {
        "learning_rate": float(common.learning_rate),
        "ppo": common.ppo,
        "epsilon": common.epsilon,
        "epsilon_high": common.epsilon_high,
        "advantage_balance": float(common.advantage_balance),
        "scale_rewards": common.scale_rewards,
        "importance_sampling_level": common.importance_sampling_level,
        "max_negative_advantage_importance_sampling_weight": max_negative_advantage_importance_sampling_weight,
        "mask_prob_ratio": check_flag("mask_prob_ratio", mask_prob_ratio),
        "kimi_k2_tau": kimi_k2_tau,
        "precalculate_logprobs": check_flag("precalculate_logprobs", precalculate_logprobs),
    }
    assert tuple(config) == wire.EXPERIMENTAL_CONFIG_KEYS
    return config


def _require_id(model: Model) -> str:
    if model.id is None:
        raise ValueError(f"model {model.name!r} has no server id; call `await model.register(backend)` first")
    return model.id


class ServerlessBackend:
    """A client of the serverless-RL API: models, training jobs and checkpoints live on the server.

    ``api_key`` defaults to ``WANDB_API_KEY``; ``base_url`` to W&B Training. Point it at ``art serverless serve``
    to self-host. GET/DELETE are retried with backoff, POST never; a job that shows no new event for
    ``no_progress_timeout`` seconds raises ``TrainingStalledError`` instead of polling forever.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        poll_interval: float = 1.0,
        no_progress_timeout: float = 1200.0,
        progress: bool = True,
    ) -> None:
        api_key = api_key if api_key is not None else os.environ.get("WANDB_API_KEY")
        if not api_key:
            raise ValueError(
                "no API key for ServerlessBackend: pass api_key=... or set the WANDB_API_KEY environment variable"
            )
        base_url = (base_url or wire.DEFAULT_BASE_URL).rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://")
        for name, value in (
            ("timeout", timeout),
            ("poll_interval", poll_interval),
            ("no_progress_timeout", no_progress_timeout),
        ):
            check_number(name, value, above=0.0)
        self.base_url = base_url
        self.api_key = api_key
        self._poll_interval = poll_interval
        self._no_progress_timeout = no_progress_timeout
        self._progress = progress
        self._api = ApiClient(
            base_url,
            api_key,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            retry=retry if retry is not None else RetryPolicy(),
        )

    def __repr__(self) -> str:
        return f"ServerlessBackend(base_url={self.base_url!r})"

    async def fork_checkpoint(
        self,
        model: TrainableModel,
        from_model: str,
        from_project: str | None = None,
        **options: Any,
    ) -> int:
        """Not supported by ServerlessBackend (the serverless API has no endpoint that copies a checkpoint between models); fork on LocalBackend instead."""
        raise NotImplementedError(
            f"ServerlessBackend cannot fork {from_project or model.project}/{from_model} into {model.name!r}: "
            "the serverless API has no endpoint that copies a checkpoint between models. Fork with LocalBackend.fork_checkpoint, or start the new model from its base_model"
        )

    _experimental_fork_checkpoint = fork_checkpoint

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self._api.aclose()

    # -- models ----------------------------------------------------------------------------------------------

    async def register(self, model: Model) -> None:
        """Create the model on the server, or find it if it exists (idempotent); sets ``model.id`` and ``entity``."""
        if not isinstance(model, TrainableModel):
            warnings.warn(
                f"model {model.name!r} is not trainable; ServerlessBackend only registers TrainableModel",
                UserWarning,
                stacklevel=2,
            )
            return
        body = {
            "entity": model.entity,
            "project": model.project,
            "name": model.name,
            "base_model": model.base_model,
            "return_existing": True,
        }
        record = wire.ModelRecord.model_validate(await self._api.post(wire.MODELS_PATH, body))
        if record.base_model != model.base_model:
            raise ValueError(
                f"model {record.entity}/{record.project}/{record.name} already exists on the server with base_model "
                f"{record.base_model!r}, not {model.base_model!r}; use another name or the same base model"
            )
        model.id = record.id
        if model.entity is None:
            model.entity = record.entity

    async def delete(self, model: TrainableModel) -> None:
        """Delete the model and its checkpoints on the server."""
        await self._api.delete(wire.model_path(_require_id(model)))
        model.id = None

    async def _prepare_backend_for_training(self, model: TrainableModel) -> tuple[str, str]:
        """Inference goes through the server's own OpenAI-compatible endpoint, with the same key."""
        return self.base_url, self.api_key

    def _model_inference_name(self, model: Model, step: int | None = None) -> str:
        if model.entity is None:
            raise ValueError(
                f"model {model.name!r} has no entity yet; call `await model.register(backend)` or pass entity=..."
            )
        return wire.artifact_name(model.entity, model.project, model.name, step)

    # -- checkpoints -----------------------------------------------------------------------------------------

    async def list_checkpoints(self, model: TrainableModel) -> list[wire.CheckpointRecord]:
        """Every kept checkpoint of ``model``, oldest first."""
        model_id = _require_id(model)
        checkpoints: list[wire.CheckpointRecord] = []
        params: dict[str, str | int] = {"order": "asc"}
        while True:
            page = await self._api.get(wire.checkpoints_path(model_id), params)
            batch = [wire.CheckpointRecord.model_validate(item) for item in page["data"]]
            checkpoints += batch
            if not page.get("has_more") or not batch:
                return checkpoints
            params = {"order": "asc", "after": batch[-1].id}

    async def _get_step(self, model: TrainableModel) -> int:
        if not model.trainable:
            return 0
        page = await self._api.get(wire.checkpoints_path(_require_id(model)), {"limit": 1, "order": "desc"})
        data = page["data"]
        return wire.CheckpointRecord.model_validate(data[0]).step if data else 0

    async def _delete_checkpoint_files(self, model: TrainableModel, steps_to_keep: list[int]) -> None:
        keep = set(steps_to_keep)
        doomed = [
            checkpoint.step
            for checkpoint in await self.list_checkpoints(model)
            if checkpoint.step not in keep
        ]
        if doomed:
            body = {"steps": doomed}
            wire.DeleteCheckpointsResult.model_validate(
                await self._api.delete(wire.checkpoints_path(_require_id(model)), body)
            )

    # -- training --------------------------------------------------------------------------------------------

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
        verbose: bool = False,
    ) -> ServerlessTrainResult:
        """Submit one training job for ``trajectory_groups``, follow its events, return the new step.

        Never logs: call ``model.log(groups, metrics=result.metrics, step=result.step)`` yourself.
        """
        common = TrainOptions(
            learning_rate=learning_rate,
            ppo=ppo,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            advantage_balance=advantage_balance,
            scale_rewards=scale_rewards,
            importance_sampling_level=importance_sampling_level,
        )
        groups = check_groups(trajectory_groups)
        if not groups:
            raise ValueError("trajectory_groups is empty; gather at least one TrajectoryGroup before train()")
        config = experimental_config(
            common,
            max_negative_advantage_importance_sampling_weight=max_negative_advantage_importance_sampling_weight,
            mask_prob_ratio=mask_prob_ratio,
            kimi_k2_tau=kimi_k2_tau,
            precalculate_logprobs=precalculate_logprobs,
        )
        model_id = _require_id(model)
        body = {
            "model_id": model_id,
            "trajectory_groups": [group.model_dump(mode="json") for group in groups],
            "experimental_config": config,
        }
        started = time.monotonic()
        job = wire.TrainingJobRecord.model_validate(await self._api.post(wire.TRAINING_JOBS_PATH, body))
        if verbose:
            tqdm.write(f"[serverless] training job {job.id} submitted for {model.name}", file=sys.stderr)
        steps, final_metrics = await self._follow_job(job.id, model.name, verbose)
        step = await self._get_step(model)
        assert model.entity is not None, "register() sets the entity"
        return ServerlessTrainResult(
            step=step,
            metrics=train_metrics(groups, steps, final_metrics, time.monotonic() - started),
            artifact_name=f"{model.entity}/{model.project}/{model.name}:step{step}",
        )

    async def train_sft(
        self,
        model: TrainableModel,
        trajectories: Iterable[Trajectory],
        /,
        *,
        learning_rate: float = 1e-4,
        epochs: int = 1,
        batch_size: int = 8,
        assistant_turns: AssistantTurns = "all",
        schedule: LearningRateSchedule = "cosine",
        warmup_ratio: float = 0.0,
        shuffle_seed: int | None = 0,
        verbose: bool = False,
    ) -> ServerlessTrainResult:
        """Submit one SFT job (art_core.sft) for ``trajectories``, follow its events, return the new step."""
        from art_serverless.sft import train_sft

        options = SFTOptions(
            learning_rate=learning_rate,
            epochs=epochs,
            batch_size=batch_size,
            assistant_turns=assistant_turns,
            schedule=schedule,
            warmup_ratio=warmup_ratio,
            shuffle_seed=shuffle_seed,
        )
        given = list(trajectories)
        sft_conversations(given, assistant_turns)  # refuse bad data here, before anything is sent
        return await train_sft(
            self, model, given, options, model_id=_require_id(model), verbose=check_flag("verbose", verbose)
        )

    async def _job_events(self, job_id: str, after: str | None) -> list[wire.EventRecord]:
        """Every event of the job after ``after``, following ``has_more`` pages."""
        events: list[wire.EventRecord] = []
        while True:
            params: dict[str, str | int] | None = None if after is None else {"after": after}
            page = await self._api.get(wire.events_path(job_id), params)
            batch = [wire.EventRecord.model_validate(item) for item in page["data"]]
            events += batch
            if not page.get("has_more") or not batch:
                return events
            after = batch[-1].id

    async def _follow_job(
        self, job_id: str, model_name: str, verbose: bool
    ) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Poll the job's events about every ``poll_interval`` until it ends; return each gradient step's metrics
        and those ``training_ended`` carries (our server sends the call's metrics there; others send none)."""
        after: str | None = None
        steps: list[dict[str, float]] = []
        last_progress = time.monotonic()
        last_error: BaseException | None = None
        bar = tqdm(
            desc=f"train {model_name}", unit="step", total=None, disable=not self._progress, leave=False
        )
        try:
            while True:
                await asyncio.sleep(self._poll_interval)
                remaining = self._no_progress_timeout - (time.monotonic() - last_progress)
                try:
                    events = await asyncio.wait_for(
                        self._job_events(job_id, after), timeout=max(remaining, 0.05)
                    )
                    last_error = None
                except ServerlessAPIError as error:
                    if not error.transient:
                        raise
                    events, last_error = [], error
                except TimeoutError as error:  # the deadline cut a poll short: keep the more telling error
                    events, last_error = [], last_error or error
                for event in events:
                    last_progress, after = time.monotonic(), event.id
                    if verbose:
                        tqdm.write(f"[serverless] job {job_id} {event.type} {event.data}", file=sys.stderr)
                    if event.type == "training_started":
                        total = event.data.get("num_sequences")
                        bar.total = total if isinstance(total, int) and total > 0 else None
                        bar.refresh()
                    elif event.type == "gradient_step":
                        metrics = step_metrics(event.data)
                        steps.append(metrics)
                        if bar.total is not None and bar.n >= bar.total:
                            bar.total = bar.n + 1
                        bar.update(1)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]}, refresh=False)
                    elif event.type == "training_failed":
                        message = event.data.get("error_message") or "the server gave no error message"
                        raise TrainingJobFailedError(job_id, str(message))
                    elif event.type == "training_ended":
                        final = event.data.get("metrics")
                        return steps, step_metrics(final) if isinstance(final, dict) else {}
                if time.monotonic() - last_progress >= self._no_progress_timeout:
                    raise TrainingStalledError(job_id, self._no_progress_timeout, last_error) from last_error
        finally:
            bar.close()

"""``ServerlessBackend.train_sft()`` and its wire body: ``POST /v1/preview/sft-training-jobs`` (an extension of
the serverless-RL API that ``art serverless serve`` implements).

The job is followed through the same events as a training job; ``training_ended`` carries the call's metrics.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pydantic
from tqdm.auto import tqdm

from art_core.model import TrainableModel
from art_core.results import ServerlessTrainResult
from art_core.sft import COMMON_SFT_DEFAULTS, AssistantTurns, LearningRateSchedule, SFTOptions
from art_core.trajectories import Trajectory
from art_serverless import wire

if TYPE_CHECKING:
    from art_serverless.backend import ServerlessBackend

SFT_JOBS_PATH = "/preview/sft-training-jobs"


class SFTConfigBody(pydantic.BaseModel):
    """The common ``train_sft()`` options, checked as every backend checks them (a 422 names a bad one)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    learning_rate: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    assistant_turns: AssistantTurns = "all"
    schedule: LearningRateSchedule = "cosine"
    warmup_ratio: float = 0.0
    shuffle_seed: int | None = 0

    @pydantic.model_validator(mode="after")
    def _as_every_backend_checks_them(self) -> SFTConfigBody:
        SFTOptions(**self.model_dump())
        return self


class CreateSFTJobBody(pydantic.BaseModel):
    """``POST /v1/preview/sft-training-jobs``: the model, its demonstrations and the options."""

    model_config = pydantic.ConfigDict(extra="forbid")

    model_id: str
    trajectories: list[dict[str, Any]] = pydantic.Field(min_length=1)
    config: SFTConfigBody = pydantic.Field(default_factory=SFTConfigBody)


assert set(SFTConfigBody.model_fields) == set(COMMON_SFT_DEFAULTS)


async def train_sft(
    backend: ServerlessBackend,
    model: TrainableModel,
    trajectories: Iterable[Trajectory],
    options: SFTOptions,
    *,
    model_id: str,
    verbose: bool,
) -> ServerlessTrainResult:
    """Send the job, follow its events to the end, and return the step it reached with the call's metrics."""
    from dataclasses import asdict

    sent = [trajectory.model_dump(mode="json") for trajectory in trajectories]
    body = {"model_id": model_id, "trajectories": sent, "config": asdict(options)}
    started = time.monotonic()
    job = wire.TrainingJobRecord.model_validate(await backend._api.post(SFT_JOBS_PATH, body))
    if verbose:
        tqdm.write(f"[serverless] SFT job {job.id} submitted for {model.name}", file=sys.stderr)
    _, final_metrics = await backend._follow_job(job.id, model.name, verbose)
    step = await backend._get_step(model)
    assert model.entity is not None, "register() sets the entity"
    return ServerlessTrainResult(
        step=step,
        metrics={**final_metrics, "time/step_wall_s": time.monotonic() - started},
        artifact_name=f"{model.entity}/{model.project}/{model.name}:step{step}",
    )

"""The serverless-RL wire format (docs/protocols.md §1): paths, bodies and records shared by client and server.

Pydantic only, so the client stays light. Records the client reads ignore unknown fields (the hosted service may
add some); bodies the server reads forbid them, so a typo is a 422 rather than a silently ignored option.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import pydantic

from art_core.plugin_api import COMMON_TRAIN_DEFAULTS, ImportanceSamplingLevel, TrainOptions

DEFAULT_BASE_URL = "https://api.training.wandb.ai/v1"
ARTIFACT_SCHEME = "wandb-artifact:///"

MODELS_PATH = "/preview/models"
TRAINING_JOBS_PATH = "/preview/training-jobs"


def model_path(model_id: str) -> str:
    """``/preview/models/{model_id}``."""
    return f"{MODELS_PATH}/{model_id}"


def checkpoints_path(model_id: str) -> str:
    """``/preview/models/{model_id}/checkpoints``."""
    return f"{MODELS_PATH}/{model_id}/checkpoints"


def events_path(job_id: str) -> str:
    """``/preview/training-jobs/{job_id}/events``."""
    return f"{TRAINING_JOBS_PATH}/{job_id}/events"


EventType = Literal["training_started", "gradient_step", "training_ended", "training_failed"]
TERMINAL_EVENTS: frozenset[str] = frozenset({"training_ended", "training_failed"})

# The keys of ``experimental_config``, in the order the client sends them.
EXPERIMENTAL_CONFIG_KEYS = (
    "learning_rate",
    "ppo",
    "epsilon",
    "epsilon_high",
    "advantage_balance",
    "scale_rewards",
    "importance_sampling_level",
    "max_negative_advantage_importance_sampling_weight",
    "mask_prob_ratio",
    "kimi_k2_tau",
    "precalculate_logprobs",
)


class _Body(pydantic.BaseModel):
    """A request body the server reads: unknown keys are errors, and no lax coercion of strings to numbers."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class _Record(pydantic.BaseModel):
    """A response record the client reads: unknown keys are ignored, and a null mapping reads as empty."""

    model_config = pydantic.ConfigDict(extra="ignore")

    @pydantic.field_validator("data", "metrics", mode="before", check_fields=False)
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class ExperimentalConfig(_Body):
    """Training options of one job; ``None`` means "the server's default".

    The bounds are those ``ServerlessBackend.train`` checks before sending (the common options through
    ``art_core``'s ``TrainOptions``, the same check), so a client that skips them gets a 422 naming the option
    rather than a job that trains on garbage.
    """

    learning_rate: float | None = pydantic.Field(default=None, gt=0.0, allow_inf_nan=False)
    ppo: bool | None = None
    epsilon: float | None = pydantic.Field(default=None, ge=0.0, allow_inf_nan=False)
    epsilon_high: float | None = pydantic.Field(default=None, ge=0.0, allow_inf_nan=False)
    advantage_balance: float | None = pydantic.Field(default=None, ge=-1.0, le=1.0, allow_inf_nan=False)
    scale_rewards: bool | None = None
    importance_sampling_level: ImportanceSamplingLevel | None = None
    max_negative_advantage_importance_sampling_weight: float | None = pydantic.Field(
        default=None, gt=0.0, allow_inf_nan=False
    )
    mask_prob_ratio: bool | None = None
    kimi_k2_tau: float | None = pydantic.Field(default=None, allow_inf_nan=False)
    precalculate_logprobs: bool | None = None

    @pydantic.model_validator(mode="after")
    def _common_options_as_every_backend_checks_them(self) -> ExperimentalConfig:
        given = self.options()
        TrainOptions(**{key: given[key] for key in COMMON_TRAIN_DEFAULTS if key in given})
        return self

    def options(self) -> dict[str, Any]:
        """The options that were given (non-None), as ``train()`` keyword arguments."""
        return {key: value for key, value in self.model_dump().items() if value is not None}


class CreateModelBody(_Body):
    """``POST /preview/models``."""

    entity: str | None = None
    project: str
    name: str
    base_model: str
    return_existing: bool = False


class CreateTrainingJobBody(_Body):
    """``POST /preview/training-jobs``; groups are validated one by one so errors can name the group."""

    model_id: str
    trajectory_groups: list[dict[str, Any]]
    experimental_config: ExperimentalConfig | None = None


class DeleteCheckpointsBody(_Body):
    """``DELETE /preview/models/{model_id}/checkpoints``."""

    steps: list[pydantic.NonNegativeInt]


class ModelRecord(_Record):
    """A model as the service knows it."""

    id: str
    entity: str
    project: str
    name: str
    base_model: str
    run_id: str | None = None


class CheckpointRecord(_Record):
    """One kept checkpoint of a model."""

    id: str
    step: int
    metrics: dict[str, Any] = pydantic.Field(default_factory=dict)


class TrainingJobRecord(_Record):
    """``POST /preview/training-jobs`` answers with the new job's id."""

    id: str


class EventRecord(_Record):
    """One event of a training job; ids ascend."""

    id: str
    type: str
    data: dict[str, Any] = pydantic.Field(default_factory=dict)


class DeleteCheckpointsResult(_Record):
    """What a checkpoint deletion did."""

    deleted_count: int
    not_found_steps: list[int] = pydantic.Field(default_factory=list)


_STEP_SUFFIX = re.compile(r"^(?P<name>.+):step(?P<step>[0-9]+)$")
# Steps are 64-bit integers; a longer suffix is not one (and int() of thousands of digits raises).
MAX_STEP_DIGITS = 18


def artifact_name(entity: str, project: str, name: str, step: int | None = None) -> str:
    """``wandb-artifact:///{entity}/{project}/{name}`` and ``...:step{N}`` for a given step."""
    base = f"{ARTIFACT_SCHEME}{entity}/{project}/{name}"
    return base if step is None else f"{base}:step{step}"


def parse_artifact_name(value: str) -> tuple[str, str, str, int | None]:
    """Split ``wandb-artifact:///entity/project/name[:stepN|:latest]`` into its parts (ValueError if not one)."""
    if not value.startswith(ARTIFACT_SCHEME):
        raise ValueError(
            f"model {value!r} is not a serverless model name; use 'wandb-artifact:///ENTITY/PROJECT/NAME' "
            "or '...:stepN' (model.get_inference_name(step) gives it)"
        )
    parts = value[len(ARTIFACT_SCHEME) :].split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"model {value!r} must have exactly ENTITY/PROJECT/NAME after {ARTIFACT_SCHEME!r}")
    entity, project, name = parts
    step: int | None = None
    match = _STEP_SUFFIX.match(name)
    if match is not None:
        if len(match["step"]) > MAX_STEP_DIGITS:
            raise ValueError(
                f"model {value[:120]!r}... names step {match['step'][:20]}... with {len(match['step'])} digits; "
                f"a step has at most {MAX_STEP_DIGITS} (pass model.get_inference_name(step))"
            )
        name, step = match["name"], int(match["step"])
    elif name.endswith(":latest"):
        name = name[: -len(":latest")]
    return entity, project, name, step

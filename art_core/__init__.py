"""art-core: trajectories, models, logging, backend contracts and plugins for RL training of LLM agents.

``import art_core as art``. Importing this package loads no torch, transformers, vllm, wandb or fastapi, and
not even openai or pyarrow until they are needed.
"""

from art_core import dev, rewards, utils
from art_core.advantages import group_advantages, normalize_batch
from art_core.backend import Backend, ImportanceSamplingLevel, TrainableBackend
from art_core.gather import (
    RolloutTimeoutError,
    TooManyExceptionsError,
    gather_trajectories,
    gather_trajectory_groups,
)
from art_core.hookspecs import hookimpl
from art_core.migration import TrainConfig
from art_core.model import Model, TrainableModel
from art_core.plugins import list_backends, list_reporters, load_backend
from art_core.results import LocalTrainResult, ServerlessTrainResult, TinkerTrainResult, TrainResult
from art_core.sft import AssistantTurns, LearningRateSchedule, SFTBackend
from art_core.sft_data import SFTDataError, read_sft_jsonl
from art_core.train_options import TrainOptions
from art_core.trajectories import History, Trajectory, TrajectoryGroup
from art_core.utils import retry
from art_core.version import __version__

__all__ = [
    "AssistantTurns",
    "Backend",
    "History",
    "ImportanceSamplingLevel",
    "LearningRateSchedule",
    "LocalTrainResult",
    "Model",
    "SFTBackend",
    "SFTDataError",
    "ServerlessTrainResult",
    "TinkerTrainResult",
    "RolloutTimeoutError",
    "TooManyExceptionsError",
    "TrainConfig",
    "TrainOptions",
    "TrainResult",
    "TrainableBackend",
    "TrainableModel",
    "Trajectory",
    "TrajectoryGroup",
    "__version__",
    "dev",
    "gather_trajectories",
    "gather_trajectory_groups",
    "group_advantages",
    "hookimpl",
    "list_backends",
    "list_reporters",
    "load_backend",
    "normalize_batch",
    "read_sft_jsonl",
    "retry",
    "rewards",
    "utils",
]

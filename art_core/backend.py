"""The contracts every backend meets: ``Backend`` (what a Model needs) and ``TrainableBackend`` (train)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from art_core.results import TrainResult
from art_core.train_options import COMMON_TRAIN_DEFAULTS, ImportanceSamplingLevel

if TYPE_CHECKING:
    from art_core.model import Model, TrainableModel
    from art_core.trajectories import TrajectoryGroup

# Re-exported: the types and defaults of the options every TrainableBackend shares live in train_options.
__all__ = ["COMMON_TRAIN_DEFAULTS", "Backend", "ImportanceSamplingLevel", "TrainableBackend"]


@runtime_checkable
class Backend(Protocol):
    """What ``Model`` needs from any backend: registration, steps, checkpoints and an inference endpoint."""

    async def register(self, model: Model) -> None: ...

    async def close(self) -> None: ...

    async def _get_step(self, model: TrainableModel) -> int: ...

    async def _delete_checkpoint_files(self, model: TrainableModel, steps_to_keep: list[int]) -> None: ...

    def _model_inference_name(self, model: Model, step: int | None = None) -> str: ...

    async def _prepare_backend_for_training(self, model: TrainableModel) -> tuple[str, str]: ...


@runtime_checkable
class TrainableBackend(Backend, Protocol):
    """A backend that trains: ``train()`` takes at least these options, with these defaults, and no ``**kwargs``."""

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
    ) -> TrainResult: ...

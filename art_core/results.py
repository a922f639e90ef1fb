"""What a backend's ``train()`` returns: frozen records, light enough for any client."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainResult:
    """The step the model reached and the metrics of the call (keys per docs/rl-math.md §4)."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalTrainResult(TrainResult):
    """``LocalBackend.train()``: where the checkpoint was written (None when ``save_checkpoint=False``)."""

    checkpoint_path: str | None = None


@dataclass(frozen=True)
class ServerlessTrainResult(TrainResult):
    """``ServerlessBackend.train()``: the checkpoint's artifact name, ``entity/project/name:stepN``."""

    artifact_name: str = ""


@dataclass(frozen=True)
class TinkerTrainResult(TrainResult):
    """``TinkerBackend.train()``: the resumable state, the sampler weights and whether they were deployed."""

    state_path: str | None = None
    sampler_path: str | None = None
    deployed: bool = False

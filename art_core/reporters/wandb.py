"""The built-in Weights & Biases reporter (``pip install art-core[wandb]``); wandb is imported on first use."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from art_core.model import Model

STEP_METRIC = "training_step"
_RECORD_ONLY_KEYS = ("step", "recorded_at")


class WandbReporter:
    """One wandb run per model (id = model name, resumed if it exists), x-axis ``training_step``."""

    def __init__(self, model: Model) -> None:
        try:
            import wandb
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("the wandb reporter needs wandb: pip install 'art-core[wandb]'") from error
        directory = os.environ.get("WANDB_DIR") or str(model.output_dir())
        os.makedirs(directory, exist_ok=True)
        self._run = wandb.init(
            project=model.project,
            entity=model.entity,
            name=model.name,
            id=model.name,
            resume="allow",
            dir=directory,
            config=model.wandb_config(),
            reinit="create_new",
            settings=wandb.Settings(silent=True, x_disable_stats=True),
        )
        self._run.define_metric(STEP_METRIC)
        for section in ("train", "val", "test", "loss", "data", "time", "costs", "throughput", "reward"):
            self._run.define_metric(f"{section}/*", step_metric=STEP_METRIC)

    @property
    def run(self) -> Any:
        return self._run

    def report(self, record: Mapping[str, Any]) -> None:
        data = {key: value for key, value in record.items() if key not in _RECORD_ONLY_KEYS}
        data[STEP_METRIC] = record["step"]
        self._run.log(data)

    def close(self) -> None:
        self._run.finish()

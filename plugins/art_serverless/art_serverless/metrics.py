"""Turn a job's ``gradient_step`` events into the metric taxonomy of docs/rl-math.md §4."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from art_core.plugin_api import is_trainable_group
from art_core.trajectories import TrajectoryGroup

# Names the hosted service uses for what our taxonomy calls otherwise. Keys that already carry a "/" are ours.
_UPSTREAM_NAMES = {
    "loss": "loss/train",
    "policy_loss": "loss/train",
    "entropy": "loss/entropy",
    "grad_norm": "loss/grad_norm",
    "learning_rate": "loss/learning_rate",
    "kl_policy_ref": "loss/kl_policy_ref",
    "kl_div": "loss/kl_div",
    "num_groups_submitted": "data/step_num_groups_submitted",
    "num_groups_trainable": "data/step_num_groups_trainable",
    "num_trajectories": "data/step_num_trajectories",
    "num_trainable_tokens": "data/step_trainer_tokens",
    "train_tokens": "data/step_trainer_tokens",
}
# Throughput figures are per-event rates: their mean over steps means nothing, so they are dropped.
_DROPPED = frozenset({"tokens_per_second"})


def canonical_metric_name(name: str) -> str | None:
    """Our key for an upstream metric name, or None when the metric is dropped."""
    if "/" in name:
        return name
    if name in _DROPPED:
        return None
    return _UPSTREAM_NAMES.get(name, name)


def step_metrics(data: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric values of one ``gradient_step`` event, under canonical names."""
    metrics: dict[str, float] = {}
    for key, value in data.items():
        name = canonical_metric_name(str(key))
        if name is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            metrics[name] = float(value)
    return metrics


def mean_metrics(steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per key, the mean over the steps that report it."""
    sums: dict[str, list[float]] = {}
    for metrics in steps:
        for key, value in metrics.items():
            sums.setdefault(key, []).append(value)
    return {key: math.fsum(values) / len(values) for key, values in sums.items()}


def batch_metrics(groups: Iterable[TrajectoryGroup]) -> dict[str, float]:
    """What the client knows about the batch it sent: groups submitted and trainable, trajectories."""
    group_list = list(groups)
    trainable = sum(is_trainable_group([t.reward for t in group.trajectories]) for group in group_list)
    return {
        "data/step_num_groups_submitted": float(len(group_list)),
        "data/step_num_groups_trainable": float(trainable),
        "data/step_num_trajectories": float(sum(len(group.trajectories) for group in group_list)),
    }


def train_metrics(
    groups: Sequence[TrajectoryGroup],
    steps: Sequence[Mapping[str, float]],
    final: Mapping[str, float],
    elapsed_s: float,
) -> dict[str, float]:
    """The metrics of one ``train()``: batch counts, then the server's (the mean over its gradient steps, or
    what ``training_ended`` carried when there was no step), then timing; server values win."""
    metrics = {**batch_metrics(groups), **(mean_metrics(steps) if steps else final)}
    metrics["data/step_num_gradient_steps"] = float(len(steps))
    metrics.setdefault("time/step_trainer_s", elapsed_s)
    return metrics

"""``art demo``: a real RL run that visibly learns to sort three letters in minutes on a CPU (plugins/art_local/DEMO.md)."""

from art_local.demo.run import DemoConfig, DemoResult, Recipe, recipe_for, run_demo
from art_local.demo.task import Triple, all_triples, answer, prompt, reward, rollout, split_triples
from art_local.demo.warm_start import (
    WARM_START_LABEL,
    WarmStartConfig,
    format_trajectories,
    format_warm_start,
)

__all__ = [
    "WARM_START_LABEL",
    "DemoConfig",
    "DemoResult",
    "Recipe",
    "Triple",
    "WarmStartConfig",
    "all_triples",
    "answer",
    "format_trajectories",
    "format_warm_start",
    "prompt",
    "recipe_for",
    "reward",
    "rollout",
    "run_demo",
    "split_triples",
]

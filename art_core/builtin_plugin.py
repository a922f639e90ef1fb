"""art-core's own plugin: the built-in ``wandb`` reporter (wandb itself is imported only when used)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from art_core.hookspecs import hookimpl


@hookimpl
def art_register_reporters(register: Callable[[str, Callable[[Any], Any]], None]) -> None:
    from art_core.reporters.wandb import WandbReporter

    register("wandb", WandbReporter)

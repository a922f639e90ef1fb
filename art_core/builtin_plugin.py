"""art-core's own plugin: the ``strict`` reference backend and the ``wandb`` reporter (wandb imported on use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from art_core.hookspecs import hookimpl


@hookimpl
def art_register_backends(register: Callable[[str, type[Any]], None]) -> None:
    from art_core.testing.strict import StrictBackend

    register("strict", StrictBackend)


@hookimpl
def art_register_reporters(register: Callable[[str, Callable[[Any], Any]], None]) -> None:
    from art_core.reporters.wandb import WandbReporter

    register("wandb", WandbReporter)

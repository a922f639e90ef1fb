"""Entry point of art-tinker (group ``art``): the ``tinker`` backend and the ``art tinker`` commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from art_core import hookimpl


@hookimpl
def art_register_backends(register: Callable[[str, type[Any]], None]) -> None:
    from art_tinker.backend import TinkerBackend

    register("tinker", TinkerBackend)


@hookimpl
def art_register_commands(cli: Any) -> None:
    from art_tinker.cli import tinker_group

    cli.add_command(tinker_group)

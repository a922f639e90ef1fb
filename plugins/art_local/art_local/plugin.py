"""Entry point of art-local (group ``art``): registers the ``local`` backend and the ``art demo`` command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from art_core import hookimpl


@hookimpl
def art_register_backends(register: Callable[[str, type[Any]], None]) -> None:
    from art_local.backend import LocalBackend

    register("local", LocalBackend)


@hookimpl
def art_register_commands(cli: Any) -> None:
    """``art demo``: a real RL run on this machine that visibly learns (art_local.demo)."""
    from art_local.demo.cli import demo

    cli.add_command(demo)

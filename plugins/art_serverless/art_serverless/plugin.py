"""art-serverless's pluggy hooks: the ``serverless`` backend and the ``art serverless serve`` command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from art_core.hookspecs import hookimpl


@hookimpl
def art_register_backends(register: Callable[[str, type[Any]], None]) -> None:
    from art_serverless.backend import ServerlessBackend

    register("serverless", ServerlessBackend)


@hookimpl
def art_register_commands(cli: Any) -> None:
    # The command module imports click only; fastapi and the server load when the command runs.
    from art_serverless.cli import serverless

    cli.add_command(serverless)

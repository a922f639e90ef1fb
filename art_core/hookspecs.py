"""The hooks a plugin can implement. Each docstring is the hook's documentation (a test checks they all are).

A plugin is a module (or object) with functions marked ``@art_core.hookimpl``, advertised under the entry-point
group ``art``::

    [project.entry-points.art]
    mybackend = "my_package.plugin"

Only functions marked ``@hookimpl`` are hooks; an ``art_*`` function without it, a name that is not one of the
hooks below, or a module that fails to import is reported by ``art backends`` with the fix, and the plugin is
skipped while every other plugin keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("art")
hookimpl = pluggy.HookimplMarker("art")


@hookspec
def art_register_backends(register: Callable[[str, type[Any]], None]) -> None:
    """Register backend classes: call ``register(name, cls)`` once per backend, e.g. ``register("local", LocalBackend)``.

    The class should satisfy ``art_core.TrainableBackend`` (or ``art_core.Backend`` for inference-only ones);
    ``art_core.load_backend(name, **kwargs)`` instantiates it.
    """


@hookspec
def art_register_reporters(register: Callable[[str, Callable[[Any], Any]], None]) -> None:
    """Register metric reporters: ``register(name, factory)`` where ``factory(model)`` returns an object with
    ``report(record: dict) -> None`` and ``close() -> None``.

    ``Model(report_metrics=[name])`` selects it; every ``Model.log`` record is handed to it.
    """


@hookspec
def art_register_commands(cli: Any) -> None:
    """Add sub-commands to the ``art`` CLI: ``cli`` is its ``click.Group``; call ``cli.add_command(...)`` or
    decorate with ``@cli.command()`` / ``@cli.group()``."""

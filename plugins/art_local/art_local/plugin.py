"""Entry point of art-local (group ``art``): registers the ``local`` backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from art_core import hookimpl


@hookimpl
def art_register_backends(register: Callable[[str, type[Any]], None]) -> None:
    from art_local.backend import LocalBackend

    register("local", LocalBackend)

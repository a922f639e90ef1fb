"""The module the ``art`` entry point names: it tells art which backends this package brings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from art_core import hookimpl


@hookimpl
def art_register_backends(register: Callable[[str, type[Any]], None]) -> None:
    from art_bigram.backend import BigramBackend  # imported on use, so `art --help` stays fast

    register("bigram", BigramBackend)

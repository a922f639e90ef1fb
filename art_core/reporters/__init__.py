"""Metric reporters: receive every ``Model.log`` record (see ``hookspecs.art_register_reporters``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Reporter(Protocol):
    """Receives each history record (``step``, ``recorded_at`` and prefixed metrics) of one model."""

    def report(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...

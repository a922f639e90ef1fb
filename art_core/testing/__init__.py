"""Testing tools for backend authors and for users' training loops.

- ``BackendConformance`` (needs pytest): the contract every backend meets, as one class to subclass.
- ``StrictBackend``: a small in-memory reference backend, no torch, that validates every input hard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from art_core.testing.strict import StrictBackend, StrictStorage

if TYPE_CHECKING:
    from art_core.testing.conformance import BackendConformance

__all__ = ["BackendConformance", "StrictBackend", "StrictStorage"]


def __getattr__(name: str) -> Any:
    if name == "BackendConformance":  # imports pytest, so only on demand
        from art_core.testing.conformance import BackendConformance

        return BackendConformance
    raise AttributeError(name)

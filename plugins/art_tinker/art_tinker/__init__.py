"""art-tinker: train on Thinking Machines' Tinker through the real ``tinker`` SDK, or on a loopback server.

``from art_tinker import TinkerBackend``; ``art tinker serve`` runs ``art_tinker.server`` locally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from art_tinker.backend import TinkerBackend

__all__ = ["TinkerBackend", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy: `art --help` loads this plugin and should not pay for the tinker SDK's import
    if name == "TinkerBackend":
        from art_tinker.backend import TinkerBackend

        return TinkerBackend
    raise AttributeError(f"module 'art_tinker' has no attribute {name!r}")

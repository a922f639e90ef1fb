"""``art_tinker.server``: a loopback implementation of the Tinker HTTP API that the unmodified SDK runs against.

``art tinker serve --host 127.0.0.1 --port 8000`` (or ``serve(...)``) starts it; point the SDK at it with
``TINKER_BASE_URL=http://127.0.0.1:8000`` and ``TINKER_API_KEY=<the server's key>``. Training runs on
art-local's functional trainer (CPU, or GPU when present); see ``protocol`` for the wire protocol.
"""

from __future__ import annotations

from art_tinker.server.serve import ServerConfig, build_app, serve

__all__ = ["ServerConfig", "build_app", "serve"]

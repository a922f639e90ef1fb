"""A self-hostable server for the serverless-RL API, running jobs on an installed backend (extra ``server``).

``create_app(ServerConfig(...))`` gives the ASGI app; ``serve(config, host=..., port=...)`` runs it; the CLI is
``art serverless serve``.
"""

from art_serverless.server.app import ServerConfig, ServerState, create_app
from art_serverless.server.serve import serve

__all__ = ["ServerConfig", "ServerState", "create_app", "serve"]

"""art-serverless: train through the serverless-RL HTTP API (hosted, or self-hosted with ``art serverless serve``).

``ServerlessBackend`` is the client; ``art_serverless.server`` (extra ``server``) is a FastAPI server that speaks
the same API and runs the jobs on an installed backend.
"""

from art_serverless.backend import ServerlessBackend, TrainingJobFailedError, TrainingStalledError
from art_serverless.transport import RetryPolicy, ServerlessAPIError

__version__ = "0.1.0"

__all__ = [
    "RetryPolicy",
    "ServerlessAPIError",
    "ServerlessBackend",
    "TrainingJobFailedError",
    "TrainingStalledError",
    "__version__",
]

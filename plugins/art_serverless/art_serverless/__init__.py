"""art-serverless: train through the serverless-RL HTTP API (hosted, or self-hosted with ``art serverless serve``)."""

__version__ = "0.1.0"

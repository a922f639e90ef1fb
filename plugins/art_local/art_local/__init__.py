"""art-local: train and serve a model on this machine (CPU, or GPU when present).

``LocalBackend`` is the entry point; the functional trainer is ``art_local.training``, the OpenAI-compatible
server ``art_local.inference`` (``VLLMEngineConfig`` configures its vLLM engine), and ``art_local.tiny``
builds an offline tiny model for tests and demos.
Importing this package loads neither torch nor transformers.
"""

from typing import Any

from art_local.backend import LocalBackend
from art_local.inference.vllm_config import VLLMEngineConfig

__version__ = "0.1.0"

__all__ = ["LocalBackend", "VLLMEngineConfig", "__version__", "plan_memory"]


def __getattr__(name: str) -> Any:
    if name == "plan_memory":  # imported on first use: it needs torch and transformers
        from art_local.training.memory import plan_memory

        return plan_memory
    raise AttributeError(f"module 'art_local' has no attribute {name!r}")

"""OpenAI-compatible inference for art-local: the Engine protocol, engines and the HTTP server.

Importing this package is cheap: torch, transformers, fastapi and vllm load with the modules that need them
(``hf``, ``server``, ``service``, ``vllm``).
"""

from art_local.inference.engine import (
    Completion,
    Engine,
    SamplingParams,
    ServedModel,
    UnknownModelError,
    split_step_name,
)

__all__ = ["Completion", "Engine", "SamplingParams", "ServedModel", "UnknownModelError", "split_step_name"]

"""art-local: train and serve a model on this machine (CPU, or GPU when present)."""

__version__ = "0.1.0"

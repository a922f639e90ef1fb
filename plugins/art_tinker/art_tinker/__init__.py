"""art-tinker: train on Thinking Machines' Tinker through the real ``tinker`` SDK."""

__version__ = "0.1.0"

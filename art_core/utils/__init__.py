"""Helpers ART examples lean on: ``iterate_dataset``, ``retry`` and ``limit_concurrency`` (ART's names)."""

from art_core.utils.iterate_dataset import DatasetBatch, iterate_dataset
from art_core.utils.limit_concurrency import limit_concurrency
from art_core.utils.retry import retry

__all__ = ["DatasetBatch", "iterate_dataset", "limit_concurrency", "retry"]

"""Judged rewards: ``ruler_score_group`` scores a group with any OpenAI-compatible LLM judge (ART's RULER)."""

from art_core.rewards.prompt import DEFAULT_RUBRIC, JudgeAnswerError, TrajectoryScore
from art_core.rewards.ruler import RulerError, RulerStats, ruler, ruler_score_group, ruler_stats

__all__ = [
    "DEFAULT_RUBRIC",
    "JudgeAnswerError",
    "RulerError",
    "RulerStats",
    "TrajectoryScore",
    "ruler",
    "ruler_score_group",
    "ruler_stats",
]

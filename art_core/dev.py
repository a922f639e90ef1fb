"""``art.dev.TrainConfig``: OpenPipe ART's experimental training options, for ``model.train(_config=...)``.

Only the deprecated ``TrainableModel.train`` reads it: each key is handed to the registered backend's
``train()`` as the keyword option of the same name, and a key the backend has no option for is a
``TypeError``. New code passes the options to ``backend.train(model, groups, ...)`` directly, typed per backend.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class TrainConfig(TypedDict, total=False):
    """ART's ``dev.TrainConfig`` keys (0.4 to 0.5.18); each maps onto the backend option of the same name."""

    advantage_balance: float
    allow_training_without_logprobs: bool
    epsilon: float
    epsilon_high: float | None
    importance_sampling_level: Literal["token", "sequence", "average", "geometric_average"]
    kimi_k2_tau: float | None
    kl_penalty_coef: float
    kl_ref_adapter_path: str | None
    logprob_calculation_chunk_size: int
    mask_prob_ratio: bool
    max_negative_advantage_importance_sampling_weight: float
    moe_routing_replay_bundle: object
    moe_routing_replay_path: str | None
    moe_routing_replay_strict: bool
    num_trajectories_learning_rate_multiplier_power: float
    packed_sequence_length: int | None
    plot_tensors: bool
    ppo: bool
    precalculate_logprobs: bool
    scale_learning_rate_by_reward_std_dev: bool
    scale_rewards: bool
    truncated_importance_sampling: float | None


__all__ = ["TrainConfig"]

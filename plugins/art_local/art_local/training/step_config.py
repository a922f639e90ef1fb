"""What one ``LocalBackend.train()`` call asks for: ``StepConfig``, frozen, typed, checked once when built.

The static side (model, LoRA, AdamW, lengths: what a checkpoint depends on) is ``TrainerConfig``; a step
reads both and changes neither. A step's learning rate is bound once, by ``learning_rate_for``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from art_core.plugin_api import check_number
from art_local.training.loss import LossConfig


@dataclass(frozen=True)
class StepConfig:
    """One call's options (docs/architecture.md §5, Local column): its learning rate and loss, how the batch is
    built from the groups, what the step computes or writes besides the update, and whether it checkpoints.

    ``learning_rate`` is the rate asked for; ``scale_learning_rate_by_reward_std_dev`` multiplies it by the
    batch's mean reward std dev (``learning_rate_for``). ``logprob_calculation_chunk_size`` bounds the tokens
    whose logits exist at once. ``plot_tensors`` writes ``{model_dir}/tensors/{step:04d}.png``.
    """

    learning_rate: float = 5e-6
    loss: LossConfig = field(default_factory=LossConfig)
    logprob_calculation_chunk_size: int = 1024
    scale_rewards: bool = True
    advantage_balance: float = 0.0
    allow_training_without_logprobs: bool = False
    precalculate_logprobs: bool = False
    scale_learning_rate_by_reward_std_dev: bool = False
    plot_tensors: bool = False
    verbose: bool = False
    save_checkpoint: bool = True

    def __post_init__(self) -> None:
        check_number("learning_rate", self.learning_rate, above=0.0, fix="pass e.g. learning_rate=5e-6")
        if self.logprob_calculation_chunk_size <= 0:
            raise ValueError(
                f"logprob_calculation_chunk_size={self.logprob_calculation_chunk_size} must be > 0"
            )

    def learning_rate_for(self, reward_std_dev: float) -> float:
        """The rate this call's optimizer step takes, for a batch whose mean reward std dev is given."""
        scale = reward_std_dev if self.scale_learning_rate_by_reward_std_dev else 1.0
        return self.learning_rate * scale

"""The functional trainer of art-local: explicit state in, state out (docs/architecture.md §6, docs/rl-math.md §3).

Two configs: ``TrainerConfig`` is static (what the components are built with and a checkpoint depends on),
``StepConfig`` is one call's (learning rate, loss, ...). Typical flow: ``components =
build_components(base_model, config)``; ``prepared = prepare_batch(groups, tokenizer)``; ``state, metrics =
train_step(SingleProcess(components), state, prepared.batch, step, learning_rate=step.learning_rate)``; ``state
= save_checkpoint(components, state, directory)``. The pieces: ``forward_backward(components, batch, step)``,
``state = optim_step(components, state, learning_rate=...)``.
"""

from art_local.training.batch import (
    PackSequence,
    PreparedBatch,
    TrainBatch,
    attention_mask_B1TT,
    pack_sequences,
    prepare_batch,
)
from art_local.training.checkpoint import (
    CheckpointMismatchError,
    LowRankMerge,
    checkpoint_steps,
    get_weights,
    load_checkpoint,
    load_weights,
    merged_state_dict,
    merged_state_dict_from_checkpoint,
    merged_weights,
    save_checkpoint,
)
from art_local.training.loss import LossConfig, PolicyLoss, policy_loss
from art_local.training.state import TrainerConfig, TrainingComponents, TrainingState, build_components
from art_local.training.step import forward_backward, sft_step, train_step
from art_local.training.step_config import StepConfig
from art_local.training.steps import (
    compute_logprobs,
    forward_backward_custom,
    optim_step,
    precalculate_old_logprobs,
)
from art_local.training.tokenize import TokenizedHistory, tokenize_history
from art_local.training.world import Ranks, SingleProcess

__all__ = [
    "CheckpointMismatchError",
    "LossConfig",
    "LowRankMerge",
    "PackSequence",
    "PolicyLoss",
    "PreparedBatch",
    "Ranks",
    "SingleProcess",
    "StepConfig",
    "TokenizedHistory",
    "TrainBatch",
    "TrainerConfig",
    "TrainingComponents",
    "TrainingState",
    "attention_mask_B1TT",
    "build_components",
    "checkpoint_steps",
    "compute_logprobs",
    "forward_backward",
    "forward_backward_custom",
    "get_weights",
    "load_checkpoint",
    "load_weights",
    "merged_state_dict",
    "merged_state_dict_from_checkpoint",
    "merged_weights",
    "optim_step",
    "pack_sequences",
    "policy_loss",
    "precalculate_old_logprobs",
    "prepare_batch",
    "save_checkpoint",
    "sft_step",
    "tokenize_history",
    "train_step",
]

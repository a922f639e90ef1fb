"""The functional trainer of art-local: explicit state in, state out (docs/architecture.md §6, docs/rl-math.md §3).

Typical flow: ``components = build_components(base_model, config)``; ``prepared = prepare_batch(groups,
tokenizer)``; ``forward_backward(components, prepared.batch, config)``; ``state = optim_step(components, state,
config)``; ``state = save_checkpoint(components, state, config, directory)``.
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
    checkpoint_steps,
    get_weights,
    load_checkpoint,
    load_weights,
    merged_state_dict,
    merged_state_dict_from_checkpoint,
    save_checkpoint,
)
from art_local.training.loss import LossConfig, PolicyLoss, policy_loss
from art_local.training.state import TrainerConfig, TrainingComponents, TrainingState, build_components
from art_local.training.steps import (
    compute_logprobs,
    forward_backward,
    forward_backward_custom,
    optim_step,
    precalculate_old_logprobs,
)
from art_local.training.tokenize import TokenizedHistory, tokenize_history

__all__ = [
    "CheckpointMismatchError",
    "LossConfig",
    "PackSequence",
    "PolicyLoss",
    "PreparedBatch",
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
    "optim_step",
    "pack_sequences",
    "policy_loss",
    "precalculate_old_logprobs",
    "prepare_batch",
    "save_checkpoint",
    "tokenize_history",
]

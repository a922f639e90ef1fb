"""``LocalBackend.train_sft()``: SFT on the model's own trainer, checkpointed and served like a ``train()`` step."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from art_core.model import TrainableModel
from art_core.results import LocalTrainResult
from art_core.sft import SFTOptions, sft_conversations
from art_core.trajectories import Trajectory

if TYPE_CHECKING:
    from art_local.backend import LocalBackend


async def train_sft(
    backend: LocalBackend,
    model: TrainableModel,
    trajectories: Iterable[Trajectory],
    options: SFTOptions,
    *,
    save_checkpoint: bool,
    verbose: bool,
) -> LocalTrainResult:
    """Tokenize, run the planned optimizer steps, then write ``checkpoints/{step:04d}`` and serve ``name@step``."""
    from art_local.backend import _checkpoints_dir, run_on
    from art_local.training import save_checkpoint as write_checkpoint
    from art_local.training.sft import sft_examples, train_sft_examples

    slot = backend._slot(model)
    backend._check_inference()
    if slot.workers is not None:
        raise NotImplementedError(
            "LocalBackend.train_sft() trains in this process only; create the backend without train_devices "
            "for the SFT phase (the checkpoint it writes is the one a train_devices backend resumes from)"
        )
    components = slot.components
    assert components is not None
    config = backend.trainer_config
    conversations = sft_conversations(trajectories, options.assistant_turns)
    async with slot.train_lock:
        started = time.perf_counter()
        async with backend._inference_asleep():
            examples = await run_on(
                slot.trainer,
                sft_examples,
                conversations,
                slot.tokenizer,
                max_sequence_length=config.max_sequence_length,
            )
            outcome = await run_on(
                slot.trainer,
                train_sft_examples,
                components,
                slot.state,
                examples,
                config,
                options,
                label=model.name,
                verbose=verbose,
            )
            slot.state = outcome.state  # the weights have moved: the step happened even if the write fails
            directory = _checkpoints_dir(model) / f"{outcome.state.step:04d}" if save_checkpoint else None
            if directory is not None:
                step_config = dataclasses.replace(config, learning_rate=options.learning_rate)
                await run_on(
                    slot.trainer, write_checkpoint, components, outcome.state, step_config, directory
                )
        metrics = {**outcome.metrics, "time/step_trainer_s": time.perf_counter() - started}
        if slot.served and backend._service is not None:
            await backend._publish(slot, components, outcome.state.step, directory)
    return LocalTrainResult(
        step=outcome.state.step,
        metrics=metrics,
        checkpoint_path=None if directory is None else str(directory),
    )

"""``LocalBackend.train_sft()``: SFT on the model's own trainer (in this process, or on its ``train_devices``
workers), checkpointed and served like a ``train()`` step."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from art_core.model import TrainableModel
from art_core.results import LocalTrainResult
from art_core.sft import SFTOptions, sft_conversations
from art_core.trajectories import Trajectory

if TYPE_CHECKING:
    from art_local.backend import LocalBackend, _Slot
    from art_local.training.sft import SftExample


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
    from art_local.training.sft import sft_examples

    slot = backend._slot(model)
    backend._check_inference()
    conversations = sft_conversations(trajectories, options.assistant_turns)
    async with slot.train_lock:
        started = time.perf_counter()
        examples = await run_on(
            slot.trainer,
            sft_examples,
            conversations,
            slot.tokenizer,
            max_sequence_length=backend.trainer_config.max_sequence_length,
        )
        options.plan(len(examples))  # refuse an empty call before anything trains
        directory = _checkpoints_dir(model) / f"{slot.state.step + 1:04d}" if save_checkpoint else None
        if slot.workers is not None:
            metrics = await _on_workers(backend, slot, examples, options, directory, verbose)
        else:
            metrics = await _here(backend, slot, examples, options, directory, verbose)
    return LocalTrainResult(
        step=slot.state.step,
        metrics={**metrics, "time/step_trainer_s": time.perf_counter() - started},
        checkpoint_path=None if directory is None else str(directory),
    )


async def _here(
    backend: LocalBackend,
    slot: _Slot,
    examples: Sequence[SftExample],
    options: SFTOptions,
    directory: Path | None,
    verbose: bool,
) -> dict[str, float]:
    from art_local.backend import run_on
    from art_local.training import save_checkpoint as write_checkpoint
    from art_local.training.sft import train_sft_examples

    components = slot.components
    assert components is not None
    async with backend._inference_asleep():
        outcome = await run_on(
            slot.trainer,
            train_sft_examples,
            components,
            slot.state,
            examples,
            options,
            label=slot.model.name,
            verbose=verbose,
        )
        slot.state = outcome.state  # the weights have moved: the step happened even if the write fails
        if directory is not None:
            await run_on(slot.trainer, write_checkpoint, components, outcome.state, directory)
    if slot.served and backend._service is not None:
        await backend._publish(slot, components, outcome.state.step, directory)
    return outcome.metrics


async def _on_workers(
    backend: LocalBackend,
    slot: _Slot,
    examples: Sequence[SftExample],
    options: SFTOptions,
    directory: Path | None,
    verbose: bool,
) -> dict[str, float]:
    from art_local.backend import run_on
    from art_local.distributed.sft import train_sft_remote

    service = backend._service
    publish = slot.served and service is not None
    if (
        publish
        and directory is None
        and slot.is_lora
        and service is not None
        and service.engine_kind == "vllm"
    ):
        raise ValueError(
            "with train_devices and the vLLM engine, the SFT step's adapter reaches vLLM through its "
            "checkpoint; call train_sft(..., save_checkpoint=True)"
        )
    async with backend._inference_asleep():
        outcome = await run_on(
            slot.trainer,
            train_sft_remote,
            slot.workers,
            slot.state,
            examples,
            options,
            checkpoint_dir=directory,
            return_weights=publish,
            label=slot.model.name,
            verbose=verbose,
        )
    slot.state = outcome.state
    if publish and service is not None and outcome.weights is not None:
        adapter_dir = directory if slot.is_lora else None
        await service.publish(slot.model.name, outcome.state.step, outcome.weights, adapter_dir=adapter_dir)
    return outcome.metrics

"""``TinkerBackend.train_sft()``: Tinker's built-in ``cross_entropy`` on the batches ``art_core.sft`` plans.

The examples are art-local's (``art_local.training.sft.sft_examples``: the same chat rendering and trained
tokens), so the same data gives the same loss on both backends. ``cross_entropy`` sums ``-logprob * weight``; each
trained token's weight is ``1 / N`` (``N`` = trained tokens of its batch), so ``loss:sum`` is the batch's mean
NLL, as art-local computes it. All steps are submitted at once (the server runs them in order); one call is one
step of the model, saved and served like a ``train()`` step.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from art_core.model import TrainableModel
from art_core.results import TinkerTrainResult
from art_core.sft import SFTOptions, sft_conversations, sft_result_metrics
from art_core.trajectories import Trajectory
from art_tinker import steps
from art_tinker.runs import LoraChoice

if TYPE_CHECKING:
    import tinker

    from art_tinker.backend import TinkerBackend

SftExample = tuple[tuple[int, ...], tuple[bool, ...]]


def sft_datums(examples: Sequence[SftExample]) -> tuple[list[tinker.Datum], int]:
    """One batch's ``Datum``s (next-token layout, weights ``1/N`` on trained targets) and its ``N``."""
    import tinker

    total = sum(sum(trained[1:]) for _, trained in examples)
    datums = []
    for tokens, trained in examples:
        weights = [1.0 / total if flag else 0.0 for flag in trained[1:]]
        datums.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(list(tokens[:-1])),
                loss_fn_inputs={
                    "target_tokens": tinker.TensorData(
                        data=list(tokens[1:]), dtype="int64", shape=[len(tokens) - 1]
                    ),
                    "weights": tinker.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
                },
            )
        )
    return datums, total


async def _run_steps(
    client: tinker.TrainingClient,
    examples: Sequence[SftExample],
    options: SFTOptions,
    label: str,
    timeout_s: float,
) -> list[tuple[float, int]]:
    """Submit every planned forward_backward + optim_step, then collect each batch's (mean NLL, tokens)."""
    import tinker
    from tqdm.auto import tqdm

    plan = options.plan(len(examples))
    submitted = []
    for index, indices in enumerate(plan):
        data, tokens = sft_datums([examples[i] for i in indices])
        backward = client.forward_backward(data, "cross_entropy")
        rate = options.learning_rate_at(index, len(plan))
        optimizer = client.optim_step(tinker.AdamParams(learning_rate=rate, **steps.ADAM))
        submitted.append((backward, optimizer, tokens, len(indices)))
    losses: list[tuple[float, int]] = []
    bar = tqdm(total=sum(len(b) for b in plan), desc=label, unit="example", leave=False, disable=None)
    try:
        for backward, optimizer, tokens, count in submitted:
            output = await backward.result_async(timeout_s)
            await optimizer.result_async(timeout_s)
            losses.append((float(output.metrics["loss:sum"]), tokens))
            bar.update(count)
            bar.set_postfix(loss=f"{losses[-1][0]:.4g}", refresh=False)
    finally:
        bar.close()
    return losses


async def train_sft(
    backend: TinkerBackend,
    model: TrainableModel,
    trajectories: Iterable[Trajectory],
    options: SFTOptions,
    lora: LoraChoice,
    *,
    save_checkpoint: bool,
    deploy_checkpoint: bool,
    verbose: bool,
    timeout_s: float,
) -> TinkerTrainResult:
    """Tokenize, train the planned batches with cross-entropy, then save and serve ``name@step``."""
    from art_local.training.sft import sft_examples

    state = backend._state(model)
    conversations = sft_conversations(trajectories, options.assistant_turns)
    async with state.lock:
        started = time.monotonic()
        log = steps.Progress(verbose, model.name)
        examples: list[Any] = await asyncio.to_thread(
            sft_examples, conversations, state.tokenizer, max_sequence_length=state.context_length
        )
        options.plan(len(examples))  # refuse an empty call before anything is created on Tinker
        client = await backend._training_client(state, lora)
        step = state.step + 1
        log(f"SFT step {step}: {len(examples)} examples, cross_entropy")
        losses = await _run_steps(client, examples, options, f"sft {model.name} → step {step}", timeout_s)
        saved = await backend._save_step(state, client, step, save_checkpoint, deploy_checkpoint, True, log)
        metrics = {
            **sft_result_metrics(losses, len(examples), options.learning_rate),
            "time/step_trainer_s": time.monotonic() - started,
        }
    return TinkerTrainResult(
        step=step,
        metrics={key: value for key, value in metrics.items() if math.isfinite(value)},
        state_path=saved.state_path,
        sampler_path=saved.sampler_path,
        deployed=deploy_checkpoint,
    )

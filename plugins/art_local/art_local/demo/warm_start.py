"""Format-only warm starts: a short SFT that teaches a tiny model the *shape* of an answer, not its content.

A freshly initialised tiny model never samples a well-formed answer, so RL alone has no signal (plugins/art_local/DEMO.md).
For the sort task the SFT answers are *random permutations* of the prompt's letters: the model learns to answer
with three letters and stop, not to sort (exact accuracy after it stays near chance, 1/6); sorting comes from RL.
The demo runs it as ``backend.train_sft(model, format_trajectories(...))``, step 1 of the RL run's own model.
``sft_warm_start`` (a cached model directory beside the tiny model) remains for tests that need a judge model.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import art_core as art
from art_core.plugin_api import atomic_replace_dir
from art_local.demo.task import Triple, messages, split_triples

if TYPE_CHECKING:
    import torch


WARM_START_LABEL = "format-only warm start: teaches the answer format, not sorting"
WARM_START_VERSION = 1  # bump when the recipe below changes what gets written

SftExample = tuple[tuple[int, ...], tuple[bool, ...]]  # token ids, and which of them the loss trains
ExampleMaker = Callable[[random.Random, Any], SftExample]  # (rng, tokenizer) -> one example


@dataclass(frozen=True)
class WarmStartConfig:
    """The SFT recipe: ``steps`` AdamW steps of ``batch_size`` examples, loss on answer tokens only."""

    steps: int = 500
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0

    def tag(self) -> str:
        """A directory-name suffix that changes whenever the recipe does."""
        lr = f"{self.learning_rate:g}".replace(".", "p").replace("-", "m")
        return f"{self.steps}x{self.batch_size}-lr{lr}-seed{self.seed}"


def warm_start_dir(base_model: Path, config: WarmStartConfig, name: str = "sortformat") -> Path:
    """Where a warm start named ``name`` of ``base_model`` is cached: a sibling directory."""
    return base_model.parent / f"{base_model.name}-{name}-v{WARM_START_VERSION}-{config.tag()}"


def format_trajectories(config: WarmStartConfig) -> list[art.Trajectory]:
    """``steps * batch_size`` train prompts, each answered by a random *permutation* of its letters (not sorted)."""
    train_triples, _ = split_triples()  # the held-out triples never reach the warm start
    rng = random.Random(config.seed)
    trajectories = []
    for _ in range(config.steps * config.batch_size):
        triple = rng.choice(train_triples)
        shuffled = "".join(rng.sample(triple, 3))
        trajectories.append(
            art.Trajectory(
                messages_and_choices=[*messages(triple), {"role": "assistant", "content": shuffled}]
            )
        )
    return trajectories


def sort_format_example(triples: Sequence[Triple], rng: random.Random, tokenizer: Any) -> SftExample:
    """A random train prompt answered by a random *permutation* of its letters + end of turn (not sorted)."""
    triple = rng.choice(triples)
    text = tokenizer.apply_chat_template(messages(triple), add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    shuffled = "".join(rng.sample(triple, 3))
    answer_ids = [*tokenizer.encode(shuffled, add_special_tokens=False), tokenizer.eos_token_id]
    return (*prompt_ids, *answer_ids), (False,) * len(prompt_ids) + (True,) * len(answer_ids)


def conversation_example(
    messages_and_choices: Sequence[Any], tools: Sequence[Any] | None, tokenizer: Any
) -> SftExample:
    """Tokens of a whole conversation, trained on its assistant turns (``Choice`` objects without logprobs).

    Uses the trainer's own tokenization, so the model learns exactly what the inference server renders.
    """
    from art_local.training import tokenize_history

    history = tokenize_history(messages_and_choices, tools, tokenizer, allow_training_without_logprobs=True)
    if history is None or not history.num_trained:
        raise ValueError("the conversation has no assistant Choice to train on")
    return history.tokens, history.trained


def format_warm_start(
    base_model: Path,
    config: WarmStartConfig = WarmStartConfig(),
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """The sort task's format-only warm start of ``base_model`` (cached); returns the model directory."""
    train_triples, _ = split_triples()  # the held-out triples never reach the warm start
    return sft_warm_start(
        base_model,
        functools.partial(sort_format_example, train_triples),
        config,
        name="sortformat",
        label=WARM_START_LABEL,
        device=device,
        progress=progress,
    )


def sft_warm_start(
    base_model: Path,
    make_example: ExampleMaker,
    config: WarmStartConfig,
    *,
    name: str,
    label: str,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Return the cached SFT of ``base_model`` on ``make_example`` (full fine-tune), training it first if needed.

    ``name`` identifies the examples in the cache: change it when ``make_example`` changes.
    """
    target = warm_start_dir(base_model, config, name)
    if (target / "warm_start.json").is_file():
        return target
    started = time.perf_counter()
    weights, final_nll = _train(base_model, make_example, config, label, device=device, progress=progress)
    record = {
        "what": label,
        "base_model": str(base_model),
        "recipe": asdict(config),
        "final_nll": final_nll,
        "seconds": round(time.perf_counter() - started, 1),
    }
    _write_model_dir(base_model, target, weights, record)
    return target


def _train(
    base_model: Path,
    make_example: ExampleMaker,
    config: WarmStartConfig,
    label: str,
    *,
    device: str | torch.device | None,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], float]:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from art_local.training import (
        TrainerConfig,
        TrainingState,
        build_components,
        forward_backward_custom,
        get_weights,
        optim_step,
    )
    from art_local.training.sft import negative_log_likelihood, sft_batch

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    trainer = TrainerConfig(lora_rank=None, seed=config.seed)
    components = build_components(base_model, trainer, device=device)
    rng = random.Random(config.seed)
    state = TrainingState()
    nll = float("nan")
    bar = tqdm(range(config.steps), desc=label, unit="step", disable=not progress, leave=False)
    for _ in bar:
        batch = sft_batch([make_example(rng, tokenizer) for _ in range(config.batch_size)])
        metrics = forward_backward_custom(components, batch, negative_log_likelihood)
        state = optim_step(
            components, state, learning_rate=config.learning_rate, tokens=batch.num_trained_tokens
        )
        nll = metrics["sft/nll"]
        bar.set_postfix(nll=f"{nll:.3f}", refresh=False)
    bar.close()
    return get_weights(components), nll  # full fine-tune: keyed like the base model's state_dict()


def _write_model_dir(
    base_model: Path, target: Path, weights: dict[str, torch.Tensor], record: dict[str, Any]
) -> None:
    """Copy the base model's files, replace its weights, then rename into place (atomic; a lost race is fine)."""
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        for source in base_model.iterdir():
            if source.is_file() and source.name != "model.safetensors":
                shutil.copy2(source, staging / source.name)
        tensors = {key: value.detach().cpu().contiguous() for key, value in weights.items()}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "warm_start.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    atomic_replace_dir(target, write, keep_existing=True)
    if not (target / "warm_start.json").is_file():
        raise FileExistsError(f"{target} exists but holds no warm start; delete it and run again")

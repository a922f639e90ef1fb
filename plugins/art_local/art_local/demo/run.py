"""The demo run: build the tiny model, warm-start its answer format with ``train_sft``, then GRPO through the real stack.

Everything a user's loop does happens here: ``LocalBackend``, ``model.register``, concurrent rollouts through
``model.openai_client()`` gathered with ``art.gather_trajectory_groups``, ``backend.train``, ``model.log`` for
``train`` and a held-out ``val`` split, and ``model.delete_checkpoints()``; the warm start is
``backend.train_sft`` (step 1 of the same model), so RL resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import art_core as art
from art_local.demo import report
from art_local.demo.task import Triple, rollout, split_triples
from art_local.demo.warm_start import WARM_START_LABEL, WarmStartConfig, format_trajectories
from art_local.tiny import TinySize

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from art_local.backend import LocalBackend

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Measured settings for one model size (plugins/art_local/DEMO.md)."""

    warm_start_steps: int
    warm_start_learning_rate: float
    learning_rate: float  # RL; train()'s default 5e-6 suits LoRA on billion-parameter models, not these
    lora_rank: int | None  # None: full fine-tune
    steps: int


# Full fine-tune with the transformers engine; LoRA where the engine is vLLM (it hot-loads adapters only).
_RECIPES: dict[tuple[str, bool], Recipe] = {
    ("tiny", False): Recipe(500, 3e-3, 1e-3, None, 200),
    ("tiny", True): Recipe(500, 3e-3, 3e-3, 8, 200),
    ("small", False): Recipe(150, 3e-4, 1e-4, None, 120),
    ("small", True): Recipe(150, 3e-4, 1e-3, 8, 120),  # not measured on a GPU yet
}


def recipe_for(size: TinySize, *, lora: bool) -> Recipe:
    """The measured recipe of ``size`` (LoRA when the inference engine needs adapters)."""
    if (size, lora) not in _RECIPES:
        raise ValueError(f"model size {size!r} is unknown; use 'tiny' or 'small'")
    return _RECIPES[(size, lora)]


@dataclass(frozen=True)
class DemoConfig:
    """What ``art demo`` runs; ``None`` fields take the size's recipe."""

    steps: int | None = None
    model_size: TinySize = "tiny"
    seed: int = 0
    output: Path = Path(".art")
    project: str = "demo"
    prompts_per_step: int = 8
    group_size: int = 8
    val_every: int = 10
    max_tokens: int = 8
    learning_rate: float | None = None
    device: str | None = None
    engine: Literal["auto", "hf", "vllm"] = "auto"
    cpu_threads: int | None = (
        None  # torch threads on CPU; None: 1 for "tiny" (see cpu_threads_for), else torch's
    )
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be at least 1")
        if self.val_every < 1:
            raise ValueError(f"val_every={self.val_every} must be at least 1")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO compares at least 2 answers per prompt")


@dataclass(frozen=True)
class DemoResult:
    """Where the run wrote its files and how validation reward moved."""

    model_dir: Path
    history_path: Path
    plot_path: Path | None
    val_reward: dict[int, float]
    kept_checkpoints: list[int]
    seconds: float
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (letters, answer at 0, answer at end)

    @property
    def improvement(self) -> float:
        """Final val/reward minus val/reward at step 0."""
        steps = sorted(self.val_reward)
        return self.val_reward[steps[-1]] - self.val_reward[steps[0]]


def cpu_threads_for(config: DemoConfig) -> int | None:
    """Torch threads for this run on CPU (None: leave torch's setting).

    The tiny model's ops are too small to gain from a second thread, and on a busy machine OpenMP threads that
    wait for each other at every op made its warm start 10x slower (measured: 100 SFT steps 57 s vs 4 s).
    """
    if config.cpu_threads is not None:
        return config.cpu_threads
    return 1 if config.model_size == "tiny" else None


def fresh_model_name(output: Path, project: str, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... so a new run never mixes with (or deletes) an earlier one."""
    models = output / project / "models"
    name, n = stem, 1
    while (models / name).exists():
        n += 1
        name = f"{stem}-{n}"
    return name


async def validate(
    client: AsyncOpenAI, model: art.TrainableModel, triples: list[Triple], config: DemoConfig, step: int
) -> list[art.TrajectoryGroup]:
    """Greedy answers to every held-out prompt, logged as the ``val`` split at ``step``."""
    name = model.get_inference_name()
    groups = await art.gather_trajectory_groups(
        (
            art.TrajectoryGroup(
                [rollout(client, name, triple, temperature=0.0, max_tokens=config.max_tokens)]
            )
            for triple in triples
        ),
        pbar_desc=f"val @ step {step}" if config.progress else None,
        pbar_leave=False,
    )
    await model.log(groups, split="val", step=step)
    return groups


async def train_step(
    client: AsyncOpenAI,
    backend: LocalBackend,
    model: art.TrainableModel,
    triples: list[Triple],
    config: DemoConfig,
    *,
    learning_rate: float,
    save_checkpoint: bool,
    label: str,
) -> tuple[list[art.TrajectoryGroup], art.LocalTrainResult]:
    """Rollouts (a group of ``group_size`` answers per prompt) → one GRPO step → ``model.log``."""
    name = model.get_inference_name()
    groups = await art.gather_trajectory_groups(
        (
            art.TrajectoryGroup(
                rollout(client, name, triple, max_tokens=config.max_tokens) for _ in range(config.group_size)
            )
            for triple in triples
        ),
        pbar_desc=label if config.progress else None,
        pbar_leave=False,
    )
    result = await backend.train(model, groups, learning_rate=learning_rate, save_checkpoint=save_checkpoint)
    await model.log(groups, metrics=result.metrics, step=result.step)
    return groups, result


def _val_mean(groups: list[art.TrajectoryGroup]) -> float:
    rewards = [t.reward for g in groups for t in g.trajectories]
    return sum(rewards) / max(len(rewards), 1)


async def run_demo(config: DemoConfig, *, echo: Echo | None = None) -> DemoResult:
    """Warm start (cached), then ``steps`` GRPO steps with a live table; returns where everything went."""
    import torch

    threads = cpu_threads_for(config)
    on_cpu = not torch.cuda.is_available() or (config.device or "").startswith("cpu")
    before = torch.get_num_threads()
    if threads is not None and on_cpu:
        torch.set_num_threads(threads)
    try:
        return await _run(config, echo or report.echo)
    finally:
        torch.set_num_threads(before)


def warm_start_config(config: DemoConfig, recipe: Recipe) -> WarmStartConfig:
    """The format-only warm start of this run: ``warm_start_steps`` SFT steps of 32 examples."""
    return WarmStartConfig(
        steps=recipe.warm_start_steps, learning_rate=recipe.warm_start_learning_rate, seed=config.seed
    )


async def warm_start(backend: LocalBackend, model: art.TrainableModel, warm: WarmStartConfig) -> int:
    """``backend.train_sft`` on random permutations of the prompts' letters (constant learning rate, the
    examples in the order drawn); logged as the ``train`` split; returns the step it wrote."""
    data = format_trajectories(warm)
    result = await backend.train_sft(
        model,
        data,
        learning_rate=warm.learning_rate,
        batch_size=warm.batch_size,
        schedule="constant",
        shuffle_seed=None,
    )
    await model.log(metrics=result.metrics, split="train", step=result.step)
    return result.step


async def _run(config: DemoConfig, say: Echo) -> DemoResult:
    from art_local.backend import LocalBackend
    from art_local.inference.service import choose_engine
    from art_local.training import TrainerConfig

    started = time.perf_counter()
    engine = choose_engine(config.engine)
    recipe = recipe_for(config.model_size, lora=engine == "vllm")
    steps = recipe.steps if config.steps is None else config.steps
    learning_rate = recipe.learning_rate if config.learning_rate is None else config.learning_rate
    say(report.header(config, engine, steps, learning_rate, recipe.lora_rank))
    from art_local.tiny import build_tiny_model

    base = await asyncio.to_thread(build_tiny_model, config.model_size, seed=config.seed)
    warm = warm_start_config(config, recipe)
    say(report.warm_start_line(warm))
    output = Path(config.output)
    backend = LocalBackend(
        str(output),
        config.device,
        trainer_config=TrainerConfig(lora_rank=recipe.lora_rank, seed=config.seed),
        engine=config.engine,
    )
    stem = f"sort-{config.model_size}-seed{config.seed}"
    model = art.TrainableModel(
        name=fresh_model_name(output, config.project, stem), project=config.project, base_model=str(base)
    )
    async with backend:
        await model.register(backend)
        start = await warm_start(backend, model, warm)
        val_reward, kept, samples = await rl_loop(
            backend,
            model,
            config,
            say,
            steps=steps,
            learning_rate=learning_rate,
            start=start,
        )
    model.close_reporters()
    result = DemoResult(
        model_dir=model.output_dir(),
        history_path=model.output_dir() / "history.jsonl",
        plot_path=report.plot(model.output_dir()),
        val_reward=val_reward,
        kept_checkpoints=kept,
        seconds=time.perf_counter() - started,
        samples=samples,
    )
    say(report.summary(result, WARM_START_LABEL))
    return result


async def rl_loop(
    backend: LocalBackend,
    model: art.TrainableModel,
    config: DemoConfig,
    say: Echo,
    *,
    steps: int,
    learning_rate: float,
    start: int = 0,
) -> tuple[dict[int, float], list[int], list[tuple[str, str, str]]]:
    """Validate at step ``start`` (the warm start's), then train ``steps`` RL steps (validating every
    ``val_every``), one table row each.

    Returns val/reward per validated step, the checkpoints kept, and sample answers before/after.
    """
    client = model.openai_client()
    train_triples, val_triples = split_triples()
    rng = random.Random(config.seed)
    say(report.table_header())
    tick = time.perf_counter()
    first_val = last_val = await validate(client, model, val_triples, config, start)
    val_reward = {start: _val_mean(first_val)}
    say(report.table_row(start, None, val_reward[start], None, time.perf_counter() - tick))
    kept: list[int] = [start]
    for new_step in range(start + 1, start + steps + 1):
        tick = time.perf_counter()
        validating = (new_step - start) % config.val_every == 0 or new_step == start + steps
        groups, result = await train_step(
            client,
            backend,
            model,
            rng.sample(train_triples, config.prompts_per_step),
            config,
            learning_rate=learning_rate,
            save_checkpoint=validating,  # checkpoint the steps validation ranks: delete_checkpoints keeps the best
            label=f"step {new_step}/{start + steps}",
        )
        val: float | None = None
        if validating:
            last_val = await validate(client, model, val_triples, config, new_step)
            val = val_reward[new_step] = _val_mean(last_val)
            kept = await model.delete_checkpoints("val/reward")
        loss = result.metrics.get("loss/train")
        say(report.table_row(new_step, _val_mean(groups), val, loss, time.perf_counter() - tick))
    return val_reward, kept, report.samples(first_val, last_val)

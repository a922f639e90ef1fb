"""What the demo prints: a header, the live per-step table, and a closing summary with a reward plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import art_core as art

if TYPE_CHECKING:
    from art_local.demo.run import DemoConfig, DemoResult
    from art_local.demo.warm_start import WarmStartConfig

_COLUMNS = (("step", 5), ("train/reward", 12), ("val/reward", 10), ("loss", 9), ("seconds", 7))
_PARAMS = {"tiny": "~0.2M", "small": "~18M"}


def echo(line: str) -> None:
    """Print a line without breaking a live progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line)


def header(config: DemoConfig, engine: str, steps: int, learning_rate: float, lora_rank: int | None) -> str:
    """The opening lines: task, model, hardware and the RL settings."""
    import torch

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.startswith("cuda") else "fp32"
    tuning = "full fine-tune" if lora_rank is None else f"LoRA r{lora_rank}"
    return "\n".join(
        [
            'art demo: reinforcement learning on \'sort three letters\' ("Sort these letters: d a c" -> "acd")',
            f"  model   : offline {config.model_size} Llama-style model ({_PARAMS.get(config.model_size, '?')} "
            f"params, seed {config.seed}), {device} {precision}, {engine} inference engine",
            "  reward  : 1.0 iff the answer is exactly the sorted letters; 100 held-out prompts for val/reward",
            f"  RL      : GRPO, {steps} steps x {config.prompts_per_step} prompts x {config.group_size} samples, "
            f"{tuning}, learning_rate={learning_rate:g}",
            "            (set explicitly: train()'s default 5e-6 is meant for LoRA on billion-parameter models "
            "and barely moves a model this small)",
        ]
    )


def warm_start_line(config: WarmStartConfig) -> str:
    """Announce the warm start (step 1, through ``train_sft``) and the RL that follows it."""
    from art_local.demo.warm_start import WARM_START_LABEL

    how = (
        f"backend.train_sft: {config.steps} steps of {config.batch_size} random permutations of the prompt's "
        "letters"
    )
    return f"[1/2] {WARM_START_LABEL} ({how})\n[2/2] RL through LocalBackend and its OpenAI-compatible server"


def _cell(value: float | None, width: int, digits: int = 3) -> str:
    return ("-" if value is None else f"{value:.{digits}f}").rjust(width)


def table_header() -> str:
    """Column names of the per-step table."""
    names = "  ".join(name.rjust(width) for name, width in _COLUMNS)
    return f"{names}\n{'  '.join('-' * width for _, width in _COLUMNS)}"


def table_row(
    step: int, train_reward: float | None, val_reward: float | None, loss: float | None, seconds: float
) -> str:
    """One line of the per-step table ("-" where a value was not measured at that step)."""
    widths = [width for _, width in _COLUMNS]
    return "  ".join(
        [
            str(step).rjust(widths[0]),
            _cell(train_reward, widths[1]),
            _cell(val_reward, widths[2]),
            _cell(loss, widths[3], 4),
            f"{seconds:.1f}".rjust(widths[4]),
        ]
    )


def plot(model_dir: Path) -> Path | None:
    """``reward.png`` beside the history (what ``art history DIR --plot`` draws); None without matplotlib."""
    from art_core.cli import history_by_step, plot_rewards
    from art_core.plugin_api import read_history

    path = model_dir / "reward.png"
    try:
        plot_rewards(history_by_step(read_history(model_dir / "history.jsonl")), path, title=model_dir.name)
    except Exception as error:  # click.ClickException when matplotlib is missing: the run itself succeeded
        echo(f"(no plot: {error})")
        return None
    return path


def samples(
    before: list[art.TrajectoryGroup], after: list[art.TrajectoryGroup], count: int = 4
) -> list[tuple[str, str, str]]:
    """(letters, answer before RL, answer after RL) for the first ``count`` held-out prompts."""
    rows = []
    for first, last in list(zip(before, after, strict=True))[:count]:
        a, b = first.trajectories[0], last.trajectories[0]
        rows.append((str(a.metadata["letters"]), str(a.metadata["answer"]), str(b.metadata["answer"])))
    return rows


def summary(result: DemoResult, warm_start_label: str) -> str:
    """The closing lines: reward before → after, sample answers, and where every file is."""
    steps = sorted(result.val_reward)
    first, last = result.val_reward[steps[0]], result.val_reward[steps[-1]]
    lines = [
        "",
        f"val/reward (greedy, 100 held-out prompts): {first:.2f} at step {steps[0]} -> {last:.2f} at step {steps[-1]} "
        f"({result.improvement:+.2f}) in {result.seconds / 60:.1f} min",
        f"  step {steps[0]} is the {warm_start_label} (train_sft); everything above it is RL",
        f"  held-out prompt -> answer at step {steps[0]} / at the end:",
    ]
    lines += [f"    {letters}  ->  {before!r} / {after!r}" for letters, before, after in result.samples]
    lines += [
        "",
        f"written under {result.model_dir}:",
        f"  history.jsonl           every step's metrics        ({result.history_path})",
        "  trajectories/{train,val}/NNNN.parquet   every rollout",
        f"  checkpoints/            kept steps {result.kept_checkpoints} (latest and best val/reward)",
    ]
    if result.plot_path is not None:
        lines.append(f"  reward.png              reward curves             ({result.plot_path})")
    lines.append(f"again: art history {result.model_dir} --plot reward.png")
    return "\n".join(lines)

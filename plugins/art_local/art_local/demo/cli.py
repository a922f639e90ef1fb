"""``art demo``: the command art-local adds to the ``art`` CLI (through ``art_register_commands``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click


@click.command()
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="RL steps [default: 200 tiny, 120 small]."
)
@click.option(
    "--model-size",
    type=click.Choice(["tiny", "small"]),
    default="tiny",
    show_default=True,
    help="tiny (~0.2M params, a few minutes on a CPU) or small (~18M, slower).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the model, warm start and RL.")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".art"),
    show_default=True,
    help="Where the run writes its history, trajectories, checkpoints and plot.",
)
@click.option(
    "--learning-rate",
    type=click.FloatRange(min=0.0),
    default=None,
    help="RL learning rate [default: the size's recipe].",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda when present, else cpu].")
@click.option(
    "--engine",
    type=click.Choice(["auto", "hf", "vllm"]),
    default="auto",
    show_default=True,
    help="Inference engine: vllm (LoRA; its interpreter is $ART_VLLM_PYTHON, else this one; on CPU only "
    "--model-size small), hf (transformers), auto (vllm on a CUDA machine that has it, else hf).",
)
@click.option("--no-progress", is_flag=True, help="No rollout progress bars (the table still prints).")
def demo(
    steps: int | None,
    model_size: str,
    seed: int,
    output: Path,
    learning_rate: float | None,
    device: str | None,
    engine: str,
    no_progress: bool,
) -> None:
    """Train a tiny model with RL to sort three letters, end to end on this machine, and show it learn."""
    from art_local.demo.run import DemoConfig, run_demo

    config = DemoConfig(
        steps=steps,
        model_size="small" if model_size == "small" else "tiny",
        seed=seed,
        output=output,
        learning_rate=learning_rate,
        device=device,
        engine="vllm" if engine == "vllm" else "hf" if engine == "hf" else "auto",
        progress=not no_progress,
    )
    asyncio.run(run_demo(config))

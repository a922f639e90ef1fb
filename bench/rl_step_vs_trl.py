"""One full RL step, ours vs TRL's ``GRPOTrainer``, same model and same work; prints one JSON line.

Work per step (both sides): 2 prompts x a group of 4 = 8 completions of exactly 32 tokens at temperature 1, a
random reward each (every group has signal), then one AdamW step of a full fine-tune, fp32 on CPU.
- Ours: the 8 rollouts are concurrent OpenAI chat completions over HTTP to ``LocalBackend``'s server
  (``logprobs=True``, ``ignore_eos``), then ``backend.train(...)``, which also publishes the new weights to the
  server (``save_checkpoint=False``: TRL writes no checkpoint per step either). ``ours_n_step_s`` is the same
  step with one request per group (``n=4``), the cheaper way to sample a single-turn group.
- TRL: ``GRPOTrainer`` (``beta=0``, no reference model) with ``bf16=False`` — TRL's default bf16 makes the
  backward pass ~18x slower on CPUs without native bf16 (ARCHITECTURE §6) — and ``gradient_checkpointing=False``
  (TRL's default True only costs time at this size); ``min_new_tokens`` forces the 32 tokens.
Each side's figure is the median step wall time over ``--steps`` steps (after ``--warmup`` steps) in each of
``--rounds`` alternating rounds, so load from elsewhere hits both sides alike.

TRL is not a dependency of this repo. Set up a side environment once (it reuses this venv's torch, transformers
and accelerate through a .pth file, so no CUDA wheels come in, and pip is held to torch==2.13.0), then run:

    .venv/bin/python bench/rl_step_vs_trl.py --setup-trl-venv ~/.cache/art/trl-venv
    .venv/bin/python bench/rl_step_vs_trl.py --size small --trl-python ~/.cache/art/trl-venv/bin/python
    .venv/bin/python bench/rl_step_vs_trl.py --size tiny --trl-python ~/.cache/art/trl-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GROUP_SIZE, COMPLETIONS_PER_STEP, COMPLETION_TOKENS = 4, 8, 32


def setup_trl_venv(directory: Path) -> Path:
    """A venv whose own site-packages hold TRL and what it adds, on top of this venv's torch stack."""
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(directory)], check=True
    )
    python = directory / "bin" / "python"
    side_site = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(side_site) / "art_main_venv.pth").write_text(site.getsitepackages()[0] + "\n")
    constraints = directory / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")  # never let pip swap torch for a CUDA build
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), "trl"], check=True)
    return python


def make_prompts(count: int, seed: int) -> list[str]:
    """``count`` sort prompts, the same on both sides."""
    from art_local.demo import all_triples, prompt

    return [prompt(triple) for triple in random.Random(seed).sample(all_triples(), count)]


async def ours(
    model_dir: Path, prompts: list[str], steps: int, warmup: int, seed: int, *, per_group: bool = False
) -> dict[str, list[float]]:
    """Rollout and train seconds of each measured LocalBackend step (rollouts over HTTP).

    One chat completion per rollout (8 concurrent requests), or with ``per_group`` one request with ``n=4``
    per group (the prompt is prefilled once per group).
    """
    import art_core as art
    from art_local import LocalBackend
    from art_local.training import TrainerConfig

    rewards = random.Random(seed)

    async def rollout(client: Any, model: art.TrainableModel, text: str) -> art.Trajectory:
        messages = [{"role": "user", "content": text}]
        completion = await client.chat.completions.create(
            model=model.get_inference_name(),
            messages=messages,
            max_tokens=COMPLETION_TOKENS,
            temperature=1.0,
            logprobs=True,
            extra_body={"ignore_eos": True},
        )
        choice = completion.choices[0]
        assert len(choice.logprobs.content) == COMPLETION_TOKENS
        return art.Trajectory(messages_and_choices=[*messages, choice], reward=rewards.random())

    async def group(client: Any, model: art.TrainableModel, text: str) -> art.TrajectoryGroup:
        messages = [{"role": "user", "content": text}]
        completion = await client.chat.completions.create(
            model=model.get_inference_name(),
            messages=messages,
            max_tokens=COMPLETION_TOKENS,
            temperature=1.0,
            logprobs=True,
            n=GROUP_SIZE,
            extra_body={"ignore_eos": True},
        )
        assert all(len(c.logprobs.content) == COMPLETION_TOKENS for c in completion.choices)
        return art.TrajectoryGroup(
            art.Trajectory(messages_and_choices=[*messages, c], reward=rewards.random())
            for c in completion.choices
        )

    rollout_s: list[float] = []
    train_s: list[float] = []
    with tempfile.TemporaryDirectory() as directory:
        backend = LocalBackend(directory, trainer_config=TrainerConfig(lora_rank=None, seed=seed))
        model = art.TrainableModel(name="bench", project="bench", base_model=str(model_dir))
        await model.register(backend)
        client = model.openai_client()
        prompts_per_step = COMPLETIONS_PER_STEP // GROUP_SIZE
        try:
            for step in range(warmup + steps):
                batch = prompts[step * prompts_per_step : (step + 1) * prompts_per_step]
                started = time.perf_counter()
                groups = await art.gather_trajectory_groups(
                    (
                        group(client, model, p)
                        if per_group
                        else art.TrajectoryGroup(rollout(client, model, p) for _ in range(GROUP_SIZE))
                        for p in batch
                    ),
                    pbar_desc=None,
                )
                rolled = time.perf_counter()
                await backend.train(model, groups, learning_rate=1e-5, save_checkpoint=False)
                rollout_s.append(rolled - started)
                train_s.append(time.perf_counter() - rolled)
        finally:
            await backend.close()
    return {"rollout_s": rollout_s[warmup:], "train_s": train_s[warmup:]}


def trl(
    python: str, model_dir: Path, prompts: list[str], steps: int, warmup: int, seed: int, threads: int | None
) -> dict[str, Any]:
    """Seconds of each measured GRPOTrainer step, run by ``python`` (the side environment)."""
    with tempfile.TemporaryDirectory() as directory:
        job = {
            "model_dir": str(model_dir),
            "prompts": prompts,
            "steps": steps,
            "warmup": warmup,
            "seed": seed,
            "group_size": GROUP_SIZE,
            "completions_per_step": COMPLETIONS_PER_STEP,
            "completion_tokens": COMPLETION_TOKENS,
            "learning_rate": 1e-5,
            "device": "cpu",
            "output_dir": directory,
            "threads": threads,
        }
        completed = subprocess.run(
            [python, str(HERE / "_trl_grpo_worker.py"), json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
    if completed.returncode != 0:
        raise RuntimeError(f"the TRL worker failed ({python}):\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    step_s = result["step_s"][warmup:]
    if len(step_s) < steps:
        raise RuntimeError(f"TRL reported {len(result['step_s'])} steps, expected {warmup + steps}")
    return {"step_s": step_s, "trl_version": result["trl_version"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--steps", type=int, default=10, help="measured steps (median), at least 10")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and TRL's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads on both sides [torch's default]"
    )
    parser.add_argument("--trl-python", help="the interpreter of the side environment that has TRL")
    parser.add_argument("--setup-trl-venv", type=Path, metavar="DIR", help="create DIR with TRL, then exit")
    args = parser.parse_args()
    if args.setup_trl_venv is not None:
        python = setup_trl_venv(args.setup_trl_venv)
        print(f"TRL installed; run: {sys.executable} {__file__} --trl-python {python}", file=sys.stderr)
        return
    if args.trl_python is None:
        parser.error("pass --trl-python PATH (create it with --setup-trl-venv DIR)")
    if args.steps < 10:
        parser.error(f"--steps {args.steps}: medians need at least 10 steps")

    from art_local.tiny import build_tiny_model

    model_dir = build_tiny_model(args.size)
    prompts = make_prompts((args.warmup + args.steps) * COMPLETIONS_PER_STEP // GROUP_SIZE, args.seed)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loads = [os.getloadavg()[0]]
    rollout_s: list[float] = []
    train_s: list[float] = []
    n_step_s: list[float] = []
    trl_s: list[float] = []
    trl_version = ""
    for _ in range(args.rounds):  # alternate, so a burst of load from elsewhere hits both sides alike
        measured = asyncio.run(ours(model_dir, prompts, args.steps, args.warmup, args.seed))
        rollout_s += measured["rollout_s"]
        train_s += measured["train_s"]
        grouped = asyncio.run(ours(model_dir, prompts, args.steps, args.warmup, args.seed, per_group=True))
        n_step_s += [r + t for r, t in zip(grouped["rollout_s"], grouped["train_s"], strict=True)]
        loads.append(os.getloadavg()[0])
        theirs = trl(args.trl_python, model_dir, prompts, args.steps, args.warmup, args.seed, args.threads)
        trl_s += theirs["step_s"]
        trl_version = theirs["trl_version"]
        loads.append(os.getloadavg()[0])
    ours_step = statistics.median(r + t for r, t in zip(rollout_s, train_s, strict=True))
    trl_step = statistics.median(trl_s)
    figures = {
        "ours_step_s": ours_step,
        "ours_rollout_s": statistics.median(rollout_s),
        "ours_train_s": statistics.median(train_s),
        "ours_n_step_s": statistics.median(n_step_s),
        "trl_step_s": trl_step,
    }

    print(
        json.dumps(
            {
                "bench": "rl_step_vs_trl",
                "size": args.size,
                "group_size": GROUP_SIZE,
                "completions_per_step": COMPLETIONS_PER_STEP,
                "completion_tokens": COMPLETION_TOKENS,
                "steps": args.steps,
                **{key: round(value, 4) for key, value in figures.items()},
                "ratio_ours_over_trl": round(ours_step / trl_step, 3),
                "ratio_ours_n_over_trl": round(figures["ours_n_step_s"] / trl_step, 3),
                "trl_version": trl_version,
                "rounds": args.rounds,
                "torch_threads": torch.get_num_threads(),
                "load_avg_1min": [round(load, 2) for load in loads],
            }
        )
    )


if __name__ == "__main__":
    main()

"""One full RL step, ours vs TRL's ``GRPOTrainer``, same model and same work; prints one JSON line.

Work per step (every side): 2 prompts x a group of 4 = 8 completions of exactly 32 tokens at temperature 1, a
random reward each (every group has signal), then one AdamW step of a full fine-tune on CPU.
- Ours: the 8 rollouts are concurrent OpenAI chat completions over HTTP to ``LocalBackend``'s server
  (``logprobs=True``, ``ignore_eos``), then ``backend.train(...)``, which also publishes the new weights to the
  server (``save_checkpoint=False``: TRL writes no checkpoint per step either). ``ours_n_step_s`` is the same
  step with one request per group (``n=4``), the cheaper way to sample a single-turn group.
- TRL: ``GRPOTrainer`` (``beta=0``, no reference model); ``min_new_tokens`` forces the 32 tokens.
Two comparisons, in the same run: ``"fp32"`` — ours with ``TrainerConfig(dtype="float32")`` (sampler and trainer),
TRL with ``bf16=False`` (its default bf16 makes the backward pass ~18x slower on CPUs without native bf16,
docs/architecture.md §6), ``gradient_checkpointing=False`` and an fp32 model; ``"defaults"`` — ours at
``dtype="auto"``, TRL at ``GRPOConfig``'s defaults (bf16, gradient checkpointing).
The sides run in lockstep, each in its own process, one step at a time in a rotating order, while the others
wait idle: a burst of load from elsewhere on a shared machine hits all of them alike. Each figure is the median
over ``--steps`` steps (after ``--warmup``); ``ratio_paired_median`` is the median of the step-by-step ratios.

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
import select
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import cpu_description

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


class TrlWorker:
    """TRL's ``GRPOTrainer`` in the side environment, stepping only when told (``_trl_grpo_worker.py``)."""

    def __init__(self, python: str, job: dict[str, Any], stderr: Any) -> None:
        self.python = python
        self._stderr = stderr
        self._process = subprocess.Popen(
            [python, str(HERE / "_trl_grpo_worker.py"), json.dumps(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        self._buffer = b""

    def ready(self, timeout_s: float = 600.0) -> None:
        """Wait until the trainer is built and blocked before its first step."""
        self._read(timeout_s, "ready")

    def step(self, timeout_s: float = 600.0) -> float:
        """Run one optimizer step; its wall time (generation + reward + loss + backward + AdamW)."""
        assert self._process.stdin is not None
        self._process.stdin.write(b"go\n")
        self._process.stdin.flush()
        return float(self._read(timeout_s, "step_s")["step_s"])

    def finish(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """TRL's version and thread count, once the last step ran."""
        return self._read(timeout_s, "trl_version")

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(30)

    def _read(self, timeout_s: float, key: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # something else printed to stdout
                if isinstance(message, dict) and key in message:
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise TimeoutError(f"the TRL worker sent no {key!r} within {timeout_s:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                self._process.wait(30)
                self._stderr.seek(0)
                tail = self._stderr.read()[-4000:].decode(errors="replace")
                raise RuntimeError(
                    f"the TRL worker ({self.python}) exited {self._process.returncode}:\n{tail}"
                )
            self._buffer += chunk


SIDES = ("trl", "trl_defaults", "ours", "ours_n", "ours_defaults")


async def lockstep(
    model_dir: Path, prompts: list[str], steps: int, warmup: int, seed: int, trl: dict[str, TrlWorker]
) -> tuple[dict[str, list[float]], str]:
    """Seconds of each measured step of every side, run one step at a time in rotating order; our default dtype.

    Ours (fp32, as TRL's ``trl`` side): one chat completion per rollout (8 concurrent requests) over HTTP to
    LocalBackend's server, then ``train()``; ``ours_n``: one request with ``n=4`` per group (the prompt is
    prefilled once per group); ``ours_defaults``: per-rollout requests with ``TrainerConfig``'s default dtype
    (``auto``), against TRL at its own defaults (``trl_defaults``).
    """
    import art_core as art
    from art_local import LocalBackend
    from art_local.training import TrainerConfig

    rewards = random.Random(seed)

    async def sample(client: Any, model: art.TrainableModel, text: str, n: int) -> list[art.Trajectory]:
        """``n`` completions of one prompt from one chat completion request, each a scored trajectory."""
        messages = [{"role": "user", "content": text}]
        completion = await client.chat.completions.create(
            model=model.get_inference_name(),
            messages=messages,
            max_tokens=COMPLETION_TOKENS,
            temperature=1.0,
            logprobs=True,
            n=n,
            extra_body={"ignore_eos": True},
        )
        assert all(len(c.logprobs.content) == COMPLETION_TOKENS for c in completion.choices)
        return [
            art.Trajectory(messages_and_choices=[*messages, c], reward=rewards.random())
            for c in completion.choices
        ]

    async def rollout(client: Any, model: art.TrainableModel, text: str) -> art.Trajectory:
        return (await sample(client, model, text, 1))[0]

    async def group(client: Any, model: art.TrainableModel, text: str) -> art.TrajectoryGroup:
        return art.TrajectoryGroup(await sample(client, model, text, GROUP_SIZE))

    measured: dict[str, list[float]] = {"rollout_s": [], "train_s": []}
    measured |= {f"{side}_step_s": [] for side in SIDES}
    with tempfile.TemporaryDirectory() as directory:
        backends = {
            dtype: LocalBackend(
                f"{directory}/{dtype}", trainer_config=TrainerConfig(lora_rank=None, seed=seed, dtype=dtype)
            )
            for dtype in ("float32", "auto")
        }
        models = {}
        for dtype, backend in backends.items():
            models[dtype] = art.TrainableModel(name="bench", project="bench", base_model=str(model_dir))
            await models[dtype].register(backend)
        default_dtype = str(backends["auto"]._slots["bench"].components.compute_dtype).removeprefix("torch.")  # type: ignore[union-attr]
        for worker in trl.values():
            await asyncio.to_thread(worker.ready)
        prompts_per_step = COMPLETIONS_PER_STEP // GROUP_SIZE

        async def our_step(batch: list[str], dtype: str, per_group: bool) -> tuple[float, float]:
            backend, model = backends[dtype], models[dtype]
            client = model.openai_client()
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
            return rolled - started, time.perf_counter() - rolled

        try:
            for step in range(warmup + steps):
                batch = prompts[step * prompts_per_step : (step + 1) * prompts_per_step]
                shift = step % len(SIDES)
                for side in SIDES[shift:] + SIDES[:shift]:
                    if side in trl:
                        seconds = await asyncio.to_thread(trl[side].step)
                    else:
                        dtype = "auto" if side == "ours_defaults" else "float32"
                        rollout_s, train_s = await our_step(batch, dtype, per_group=side == "ours_n")
                        seconds = rollout_s + train_s
                        if side == "ours" and step >= warmup:
                            measured["rollout_s"].append(rollout_s)
                            measured["train_s"].append(train_s)
                    if step >= warmup:
                        measured[f"{side}_step_s"].append(seconds)
        finally:
            for backend in backends.values():
                await backend.close()
    return measured, default_dtype


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (median), at least 10")
    parser.add_argument("--warmup", type=int, default=2)
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
    job = {
        "model_dir": str(model_dir),
        "prompts": prompts,
        "seed": args.seed,
        "group_size": GROUP_SIZE,
        "completions_per_step": COMPLETIONS_PER_STEP,
        "completion_tokens": COMPLETION_TOKENS,
        "max_steps": args.warmup + args.steps,
        "learning_rate": 1e-5,
        "device": "cpu",
        "threads": args.threads,
    }
    with tempfile.TemporaryDirectory() as directory, tempfile.TemporaryFile() as stderr:
        trl = {
            side: TrlWorker(
                args.trl_python,
                {**job, "output_dir": f"{directory}/{side}", "trl_defaults": side == "trl_defaults"},
                stderr,
            )
            for side in ("trl", "trl_defaults")
        }
        try:
            measured, default_dtype = asyncio.run(
                lockstep(model_dir, prompts, args.steps, args.warmup, args.seed, trl)
            )
            theirs = {side: worker.finish() for side, worker in trl.items()}
        finally:
            for worker in trl.values():
                worker.kill()
    loads.append(os.getloadavg()[0])
    rollout_s, train_s = measured["rollout_s"], measured["train_s"]
    medians = {side: statistics.median(measured[f"{side}_step_s"]) for side in SIDES}

    def paired(ours: str, trl_side: str) -> float:
        pairs = zip(measured[f"{ours}_step_s"], measured[f"{trl_side}_step_s"], strict=True)
        return round(statistics.median(o / t for o, t in pairs), 3)

    print(
        json.dumps(
            {
                "bench": "rl_step_vs_trl",
                "size": args.size,
                "group_size": GROUP_SIZE,
                "completions_per_step": COMPLETIONS_PER_STEP,
                "completion_tokens": COMPLETION_TOKENS,
                "steps": args.steps,
                "fp32": {
                    "ours_step_s": round(medians["ours"], 4),
                    "ours_rollout_s": round(statistics.median(rollout_s), 4),
                    "ours_train_s": round(statistics.median(train_s), 4),
                    "ours_n_step_s": round(medians["ours_n"], 4),
                    "trl_step_s": round(medians["trl"], 4),
                    "ratio_ours_over_trl": round(medians["ours"] / medians["trl"], 3),
                    "ratio_ours_n_over_trl": round(medians["ours_n"] / medians["trl"], 3),
                    "ratio_paired_median": paired("ours", "trl"),
                },
                "defaults": {
                    "ours_dtype": default_dtype,
                    "trl_bf16": theirs["trl_defaults"]["bf16"],
                    "trl_gradient_checkpointing": theirs["trl_defaults"]["gradient_checkpointing"],
                    "ours_step_s": round(medians["ours_defaults"], 4),
                    "trl_step_s": round(medians["trl_defaults"], 4),
                    "ratio_ours_over_trl": round(medians["ours_defaults"] / medians["trl_defaults"], 3),
                    "ratio_paired_median": paired("ours_defaults", "trl_defaults"),
                },
                "cpu": cpu_description(),
                "trl_version": theirs["trl"]["trl_version"],
                "torch_threads": torch.get_num_threads(),
                "trl_torch_threads": theirs["trl"]["torch_threads"],
                "load_avg_1min": [round(load, 2) for load in loads],
            }
        )
    )


if __name__ == "__main__":
    main()

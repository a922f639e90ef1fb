"""Benchmark: one warm ``LocalBackend.train()`` step vs a minimal hand-written PyTorch GRPO step.

Same model (``art_local.tiny`` sizes), same batch (8 completions of 32 tokens, groups of 4), LoRA and full
fine-tune, in each compute dtype asked for (``--dtypes float32,bfloat16``). Both sides use the same dtype; bf16 is
autocast with fp32 trainable weights and the LoRA base held in bf16, as ``TrainerConfig(dtype="bfloat16")`` does.
The two implementations alternate step by step in one process so they share the machine's noise; peak RSS
comes from a separate process per implementation. Prints exactly one JSON line.

    .venv/bin/python bench/train_step.py --sizes tiny,small --steps 10 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _machine import cpu_description

COMPLETIONS, GROUP_SIZE, COMPLETION_TOKENS = 8, 4, 32
SAVE = [False]  # --save-checkpoint: write each step's checkpoint, as a real run does
DTYPES = ("float32", "bfloat16")
DTYPE = ["float32"]  # the compute dtype of the current comparison, on both sides
LEARNING_RATE, LORA_RANK, CLIP_EPSILON = 1e-5, 8, 0.2


def _batch_spec(tokenizer: Any) -> list[tuple[list[dict[str, str]], list[int], float]]:
    """(prompt messages, 32 completion token ids, reward) per completion, deterministic."""
    rng = random.Random(0)
    letters = "abcdefghij"
    specs = []
    for group in range(COMPLETIONS // GROUP_SIZE):
        prompt = [{"role": "user", "content": "Sort these letters: " + " ".join(rng.sample(letters, 3))}]
        for member in range(GROUP_SIZE):
            ids = [rng.randrange(3, len(tokenizer)) for _ in range(COMPLETION_TOKENS)]
            specs.append((prompt, ids, float((member + group) % GROUP_SIZE == 0)))
    return specs


def _groups(specs: list[tuple[list[dict[str, str]], list[int], float]]) -> list[Any]:
    from openai.types.chat import ChatCompletionMessage, ChatCompletionTokenLogprob
    from openai.types.chat.chat_completion import Choice, ChoiceLogprobs

    import art_core as art

    trajectories = []
    for prompt, ids, reward in specs:
        entries = [
            ChatCompletionTokenLogprob(token=f"token_id:{i}", logprob=-6.9, top_logprobs=[]) for i in ids
        ]
        choice = Choice(
            finish_reason="length",
            index=0,
            message=ChatCompletionMessage(role="assistant", content="x"),
            logprobs=ChoiceLogprobs(content=entries),
        )
        trajectories.append(art.Trajectory(messages_and_choices=[*prompt, choice], reward=reward))
    return [art.TrajectoryGroup(trajectories[i : i + GROUP_SIZE]) for i in range(0, COMPLETIONS, GROUP_SIZE)]


Stepper = Callable[[], None]


def _timing(phases: dict[str, float], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, adding the seconds each call takes to ``phases[name]``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - started

    return timed


def _breakdown(total_s: float, metrics: dict[str, float], phases: dict[str, float]) -> dict[str, float]:
    """Where one train() call's seconds went: the trainer's own spans, then what surrounds them."""
    inside = {
        key: metrics.get(f"time/step_{key}_s", 0.0) for key in ("prepare", "forward_backward", "optimizer")
    }
    checkpoint, publish = phases.get("checkpoint_write", 0.0), metrics.get("time/step_publish_s", 0.0)
    trainer = metrics["time/step_trainer_s"]
    return {
        "template_tokenize_s": metrics.get("time/step_tokenize_s", 0.0),
        "pack_s": metrics.get("time/step_pack_s", 0.0),
        # checks, advantages and token weights
        "prepare_other_s": inside["prepare"]
        - metrics.get("time/step_tokenize_s", 0.0)
        - metrics.get("time/step_pack_s", 0.0),
        "forward_backward_s": inside["forward_backward"],
        "optimizer_s": inside["optimizer"],
        "checkpoint_write_s": checkpoint,
        # thread hop onto the trainer, metrics, inference sleep/wake around the step
        "trainer_thread_other_s": trainer - sum(inside.values()) - checkpoint,
        "publish_s": publish,
        # option checks, locks and the hop back to the caller's event loop
        "outside_trainer_s": total_s - trainer - publish,
    }


def _local_stepper(
    size: str, mode: str, workdir: str, breakdowns: list[dict[str, float]] | None = None
) -> Stepper:
    """One warm ``LocalBackend.train()`` call per invocation (checkpoint writes off, as in a hot loop).

    With ``breakdowns``, each call appends where its time went (``_breakdown``)."""
    from transformers import AutoTokenizer

    import art_core as art
    from art_local.backend import LocalBackend
    from art_local.tiny import build_tiny_model
    from art_local.training import TrainerConfig

    directory = build_tiny_model(size)  # type: ignore[arg-type]
    groups = _groups(_batch_spec(AutoTokenizer.from_pretrained(directory)))
    config = TrainerConfig(lora_rank=LORA_RANK if mode == "lora" else None, dtype=DTYPE[0])  # type: ignore[arg-type]
    backend = LocalBackend(workdir, device="cpu", trainer_config=config)
    model = art.TrainableModel(name="bench", project="bench", base_model=str(directory))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(model.register(backend))  # served, as in a real run: every step is published

    phases: dict[str, float] = {}
    import art_local.training

    art_local.training.save_checkpoint = _timing(
        phases, "checkpoint_write", art_local.training.save_checkpoint
    )

    def step() -> None:
        phases.clear()
        started = time.perf_counter()
        result = loop.run_until_complete(
            backend.train(model, groups, learning_rate=LEARNING_RATE, ppo=True, save_checkpoint=SAVE[0])
        )
        if breakdowns is not None:
            breakdowns.append(_breakdown(time.perf_counter() - started, result.metrics, phases))

    return step


def _baseline_stepper(size: str, mode: str) -> Stepper:
    """The minimal GRPO step: padded batch, forward, clipped policy loss, backward, clip, AdamW."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from art_local.tiny import build_tiny_model

    directory = build_tiny_model(size)  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    specs = _batch_spec(tokenizer)
    bf16 = DTYPE[0] == "bfloat16"
    # a frozen LoRA base may live in bf16; trained weights stay fp32 (autocast computes in bf16)
    load_dtype = torch.bfloat16 if bf16 and mode == "lora" else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=load_dtype)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=16, target_modules=targets))
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    rows = []
    for prompt, ids, _ in specs:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        rows.append((tokenizer.encode(text, add_special_tokens=False), ids))
    length = max(len(p) + len(c) for p, c in rows)
    tokens = torch.full((len(rows), length), tokenizer.pad_token_id)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    completion = torch.zeros((len(rows), length), dtype=torch.bool)
    for row, (prompt_ids, ids) in enumerate(rows):
        tokens[row, : len(prompt_ids) + len(ids)] = torch.tensor(prompt_ids + ids)
        attention[row, : len(prompt_ids) + len(ids)] = 1
        completion[row, len(prompt_ids) : len(prompt_ids) + len(ids)] = True
    rewards = torch.tensor([reward for _, _, reward in specs]).view(-1, GROUP_SIZE)
    centred = rewards - rewards.mean(1, keepdim=True)
    advantages = (centred / (rewards.std(1, unbiased=False, keepdim=True) + 1e-6)).view(-1, 1)
    mask = completion[:, 1:]
    old = torch.full(mask.shape, -6.9)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=tokens, attention_mask=attention).logits[:, :-1].float()
        new = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        ratio = torch.exp(new - old)
        clipped = torch.clamp(ratio, 1 - CLIP_EPSILON, 1 + CLIP_EPSILON)
        loss = -(torch.minimum(ratio * advantages, clipped * advantages) * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _timed(step: Stepper) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _interleaved(size: str, mode: str, steps: int, warmup: int) -> dict[str, list[float]]:
    """Alternate one local and one baseline step, so both see the same machine noise."""
    with tempfile.TemporaryDirectory() as workdir:
        breakdowns: list[dict[str, float]] = []
        steppers = {
            "local": _local_stepper(size, mode, workdir, breakdowns),
            "baseline": _baseline_stepper(size, mode),
        }
        # The baseline computes on this thread, LocalBackend on its trainer thread, which gives its OpenMP workers
        # back after each call (art_local.openmp). This thread's pool must go too, outside the timed step: kept
        # idle, it puts libgomp's workers over the core count and every later op of the trainer waits by
        # sleeping (measured: small LoRA fwd+bwd 0.37 s on the trainer thread vs 0.17 s alone).
        from art_local.openmp import release_openmp_workers

        for _ in range(warmup):
            for step in steppers.values():
                step()
                release_openmp_workers()
        times: dict[str, list[float]] = {"local": [], "baseline": []}
        for index in range(steps):
            order = ("local", "baseline") if index % 2 == 0 else ("baseline", "local")
            for kind in order:
                times[kind].append(_timed(steppers[kind]))
                release_openmp_workers()
        measured = breakdowns[-steps:]
        return times | {f"overhead:{key}": [b[key] for b in measured] for key in measured[0]}


def _peak_rss_worker(kind: str, size: str, mode: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        step = _local_stepper(size, mode, workdir) if kind == "local" else _baseline_stepper(size, mode)
        for _ in range(steps):
            step()
    print(json.dumps({"peak_rss_mb": _own_peak_rss_mb()}))


def _own_peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (getrusage's ru_maxrss keeps the parent's peak across fork + exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peak_rss(kind: str, size: str, mode: str, steps: int) -> float:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--size",
        size,
        "--mode",
        mode,
        "--steps",
        str(steps),
        "--dtype",
        DTYPE[0],
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker ({size}, {mode}) failed: {done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def _dtype_list(text: str) -> list[str]:
    """``--dtypes``: a comma-separated list of ``DTYPES`` (an unknown name is an error naming it)."""
    names = text.split(",")
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    return names


def main() -> None:
    """Parse arguments, run the workers and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--save-checkpoint", action="store_true", help="write a checkpoint every step")
    parser.add_argument(
        "--dtypes",
        type=_dtype_list,
        default=["float32"],
        help="compute dtypes to compare in, e.g. float32,bfloat16 (both sides)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["local", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    SAVE[0] = args.save_checkpoint
    DTYPE[0] = args.dtype
    if args.worker:
        _peak_rss_worker(args.worker, args.size, args.mode, args.warmup + 2)
        return
    results = []
    for size, mode, dtype in itertools.product(args.sizes.split(","), args.modes.split(","), args.dtypes):
        DTYPE[0] = dtype
        times = _interleaved(size, mode, args.steps, args.warmup)
        local, baseline = statistics.median(times["local"]), statistics.median(times["baseline"])
        results.append(
            {
                "size": size,
                "mode": mode,
                "dtype": dtype,
                "local_median_s": round(local, 5),
                "baseline_median_s": round(baseline, 5),
                "ratio": round(local / baseline, 4),
                "local_min_s": round(min(times["local"]), 5),
                "baseline_min_s": round(min(times["baseline"]), 5),
                "ratio_of_mins": round(min(times["local"]) / min(times["baseline"]), 4),
                "local_peak_rss_mb": round(_peak_rss("local", size, mode, args.warmup + 2), 1),
                "baseline_peak_rss_mb": round(_peak_rss("baseline", size, mode, args.warmup + 2), 1),
                # median seconds per phase of the local train() call (sums to about local_median_s)
                "local_breakdown_median_s": {
                    key.split(":", 1)[1]: round(statistics.median(values), 5)
                    for key, values in times.items()
                    if key.startswith("overhead:")
                },
            }
        )
    import torch

    figures = {
        "bench": "train_step",
        "batch": f"{COMPLETIONS} completions x {COMPLETION_TOKENS} tokens, groups of {GROUP_SIZE}",
        "steps_per_run": args.steps,
        "device": "cpu",
        "save_checkpoint": args.save_checkpoint,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "results": results,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

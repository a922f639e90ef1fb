"""Benchmark: one warm ``LocalBackend.train()`` step vs a minimal hand-written PyTorch GRPO step.

Same model (``art_local.tiny`` sizes), same batch (8 completions of 32 tokens, groups of 4), LoRA and full
fine-tune. Each (size, mode, implementation) runs in its own process so peak RSS is its own; the two
implementations alternate to share the machine's noise. Prints exactly one JSON line.

    .venv/bin/python bench/train_step.py --sizes tiny,small --steps 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

COMPLETIONS, GROUP_SIZE, COMPLETION_TOKENS = 8, 4, 32
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


def _time_local(size: str, mode: str, steps: int, warmup: int) -> list[float]:
    from transformers import AutoTokenizer

    import art_core as art
    from art_local.backend import LocalBackend
    from art_local.tiny import build_tiny_model
    from art_local.training import TrainerConfig

    directory = build_tiny_model(size)  # type: ignore[arg-type]
    groups = _groups(_batch_spec(AutoTokenizer.from_pretrained(directory)))
    config = TrainerConfig(lora_rank=LORA_RANK if mode == "lora" else None)

    async def run() -> list[float]:
        with tempfile.TemporaryDirectory() as path:
            backend = LocalBackend(path, device="cpu", trainer_config=config)
            model = art.TrainableModel(name="bench", project="bench", base_model=str(directory))
            await backend.register(model)
            times = []
            for index in range(warmup + steps):
                start = time.perf_counter()
                await backend.train(
                    model, groups, learning_rate=LEARNING_RATE, ppo=True, save_checkpoint=False
                )
                if index >= warmup:
                    times.append(time.perf_counter() - start)
            await backend.close()
            return times

    return asyncio.run(run())


def _time_baseline(size: str, mode: str, steps: int, warmup: int) -> list[float]:
    """The minimal GRPO step: padded batch, forward, clipped policy loss, backward, clip, AdamW."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from art_local.tiny import build_tiny_model

    directory = build_tiny_model(size)  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    specs = _batch_spec(tokenizer)
    model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=16, target_modules=targets))
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
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (
        rewards.std(1, unbiased=False, keepdim=True) + 1e-6
    )
    advantages = advantages.view(-1, 1).expand(-1, length - 1)
    mask = completion[:, 1:]
    old = torch.full(mask.shape, -6.9)
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        logits = model(input_ids=tokens, attention_mask=attention).logits[:, :-1].float()
        new = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        ratio = torch.exp(new - old)
        clipped = torch.clamp(ratio, 1 - CLIP_EPSILON, 1 + CLIP_EPSILON)
        loss = -(torch.minimum(ratio * advantages, clipped * advantages) * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _worker(args: argparse.Namespace) -> None:
    timer = _time_local if args.worker == "local" else _time_baseline
    times = timer(args.size, args.mode, args.steps, args.warmup)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"median_s": statistics.median(times), "peak_rss_mb": peak_mb, "times_s": times}))


def _run_worker(kind: str, size: str, mode: str, steps: int, warmup: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", kind, "--size", size, "--mode", mode]
    command += ["--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker ({size}, {mode}) failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    """Parse arguments, run the workers and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating worker runs per implementation")
    parser.add_argument("--worker", choices=["local", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    results = []
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            runs: dict[str, list[dict[str, Any]]] = {"local": [], "baseline": []}
            for round_index in range(args.rounds):
                order = ("local", "baseline") if round_index % 2 == 0 else ("baseline", "local")
                for kind in order:
                    runs[kind].append(_run_worker(kind, size, mode, args.steps, args.warmup))
            local = statistics.median(t for run in runs["local"] for t in run["times_s"])
            baseline = statistics.median(t for run in runs["baseline"] for t in run["times_s"])
            results.append(
                {
                    "size": size,
                    "mode": mode,
                    "local_median_s": round(local, 5),
                    "baseline_median_s": round(baseline, 5),
                    "ratio": round(local / baseline, 4),
                    "local_peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs["local"]), 1),
                    "baseline_peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs["baseline"]), 1),
                }
            )
    import torch

    figures = {
        "bench": "train_step",
        "batch": f"{COMPLETIONS} completions x {COMPLETION_TOKENS} tokens, groups of {GROUP_SIZE}",
        "steps_per_run": args.steps,
        "rounds": args.rounds,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

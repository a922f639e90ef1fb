"""How one RL step's cost grows with group size, completion length and model size; one JSON line, one PNG.

The step is ``bench/rl_step_vs_trl.py``'s, on our side only: ``--groups`` prompts x a group of G rollouts, each
one OpenAI chat completion over HTTP to ``LocalBackend``'s server (all concurrent, ``logprobs=True``,
``ignore_eos``, exactly L tokens, temperature 1), a random reward each, then one ``backend.train()``
(``save_checkpoint=False``; LoRA rank 8 unless ``--mode full``). One axis varies at a time from the base point
(the middle value of each axis: G=8, L=128, ``small``), so the full grid is 7 points:

- group size G: 4, 8, 16;   completion length L: 32, 128, 256 tokens;
- model size: ``tiny`` and ``small`` (``art_local.tiny``) and ``100m``, a random-init Llama-style config
  (hidden 768, MLP 2048, 16 layers, 12 heads / 4 KV heads) built offline as ``bench/memory.py`` builds its
  models (``save_random_model``), with the tiny models' tokenizer and chat template (vocab 1024).

Each point runs in a fresh worker process that holds the trainer, the inference server and the HTTP client.
Per point: the median over ``--steps`` steps (after ``--warmup``) of the step, its rollout and train parts, and
train split into the trainer's ``time/step_*`` spans (``bench/train_step.py``'s breakdown); peak RSS is the
worker's VmHWM over the measured steps (reset after the warmup), plus that of any child process it started
(``children_peak_rss_mb``, 0 when inference runs in-process). ``--quick`` is a smoke run: 4 points of tiny and small models, 1 step each.

    .venv/bin/python bench/scaling.py --output scaling.png
    .venv/bin/python bench/scaling.py --quick --output /tmp/scaling-quick.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import cpu_description

HERE = Path(__file__).resolve().parent
# name → (hidden, MLP width, layers, heads, KV heads): ~101M parameters with the tiny tokenizer's 1024 vocab
RANDOM_SIZES = {"100m": (768, 2048, 16, 12, 4)}
FULL = {"group_size": [4, 8, 16], "completion_tokens": [32, 128, 256], "size": ["tiny", "small", "100m"]}
QUICK = {"group_size": [2, 4], "completion_tokens": [8, 16], "size": ["tiny", "small"]}
AXES = list(FULL)


def model_dir(size: str, models: Path) -> Path:
    """The directory of ``size``: an ``art_local.tiny`` model, or a random config built once under ``models``."""
    from art_local.tiny import build_tiny_model

    if size not in RANDOM_SIZES:
        return build_tiny_model(size)  # type: ignore[arg-type]
    target = models / size
    if (target / "config.json").exists():
        return target
    from art_local.training.measure_memory import save_random_model

    tokenizer_dir = build_tiny_model("small")
    config = json.loads((tokenizer_dir / "config.json").read_text())
    hidden, mlp, layers, heads, kv_heads = RANDOM_SIZES[size]
    config.update(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
    )
    staging = Path(tempfile.mkdtemp(dir=models, prefix=f".{size}-"))
    save_random_model(staging, **{k: v for k, v in config.items() if k not in ("architectures", "dtype")})
    for path in tokenizer_dir.iterdir():  # tokenizer files and chat template, not the weights or config
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy(path, staging / path.name)
    staging.rename(target)
    return target


def _status_mb(pid: int | str, field: str) -> float | None:
    """``field`` (VmRSS, VmHWM) of process ``pid`` in MiB; None once it has exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith(f"{field}:")), 0.0)


def _peaks_mb(pids: list[int]) -> dict[int, float]:
    """VmHWM of each live process in ``pids``, in MiB."""
    return {pid: peak for pid in pids if (peak := _status_mb(pid, "VmHWM")) is not None}


def _descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (from /proc/PID/task/*/children)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _reset_peaks(pids: list[int]) -> bool:
    """Reset the peak-RSS counter of each process to its RSS now (False where /proc refuses)."""
    try:
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def _rollout(client: Any, model: Any, text: str, tokens: int, reward: float) -> Any:
    """One completion of exactly ``tokens`` tokens, as a scored trajectory."""
    import art_core as art

    messages = [{"role": "user", "content": text}]
    completion = await client.chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,
        max_tokens=tokens,
        temperature=1.0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    choice = completion.choices[0]
    assert len(choice.logprobs.content) == tokens, len(choice.logprobs.content)
    return art.Trajectory(messages_and_choices=[*messages, choice], reward=reward)


async def run_point(point: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then time ``job["steps"]`` RL steps of one point; medians, spans and peak RSS."""
    from rl_step_vs_trl import make_prompts  # bench/ is this script's sys.path[0]
    from train_step import _breakdown, _timing

    import art_core as art
    from art_local import LocalBackend
    from art_local.training import TrainerConfig

    group_size, tokens, groups = point["group_size"], point["completion_tokens"], job["groups"]
    steps, warmup = job["steps"], job["warmup"]
    prompts = make_prompts((steps + warmup) * groups, job["seed"])
    rewards = random.Random(job["seed"])
    config = TrainerConfig(lora_rank=None if job["mode"] == "full" else 8, dtype=job["dtype"])
    samples: dict[str, list[float]] = {"rollout_s": [], "train_s": []}
    spans: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as workdir:
        backend = LocalBackend(workdir, device="cpu", trainer_config=config)
        model = art.TrainableModel(name="scaling", project="bench", base_model=str(point["model_dir"]))
        await model.register(backend)
        registered = _status_mb("self", "VmRSS") or 0.0
        phases: dict[str, float] = {}
        backend._publish = _timing(phases, "publish", backend._publish)  # type: ignore[method-assign]
        client = model.openai_client()
        try:
            for step in range(warmup + steps):
                if step == warmup:
                    before = _peaks_mb([os.getpid(), *_descendants(os.getpid())])
                    reset = _reset_peaks(list(before))
                batch = prompts[step * groups : (step + 1) * groups]
                started = time.perf_counter()
                finished = await art.gather_trajectory_groups(
                    (
                        art.TrajectoryGroup(
                            _rollout(client, model, text, tokens, rewards.random()) for _ in range(group_size)
                        )
                        for text in batch
                    ),
                    pbar_desc=None,
                )
                rolled = time.perf_counter()
                phases.clear()
                result = await backend.train(model, finished, learning_rate=1e-5, save_checkpoint=False)
                done = time.perf_counter()
                if step >= warmup:
                    samples["rollout_s"].append(rolled - started)
                    samples["train_s"].append(done - rolled)
                    spans.append(_breakdown(done - rolled, result.metrics, phases))
            children = _descendants(os.getpid())
            peaks = _peaks_mb([os.getpid(), *children])
        finally:
            await backend.close()
    memory = {"registered_rss_mb": registered, "before": before, "peaks": peaks, "reset": reset}
    return _summary(point, config, samples, spans, memory)


def _summary(
    point: dict[str, Any],
    config: Any,
    samples: dict[str, list[float]],
    spans: list[dict[str, float]],
    memory: dict[str, Any],
) -> dict[str, Any]:
    """One point's JSON record."""
    import torch
    from transformers import AutoConfig

    from art_local.training.memory import count_parameters
    from art_local.training.state import resolve_dtype

    parameters, trainable = count_parameters(
        AutoConfig.from_pretrained(point["model_dir"]), config.lora_rank, config.lora_targets
    )
    me, peaks = os.getpid(), memory["peaks"]
    step_s = [r + t for r, t in zip(samples["rollout_s"], samples["train_s"], strict=True)]
    completions = point["group_size"] * point["groups"]
    return {
        "size": point["size"],
        "parameters": parameters,
        "trainable_parameters": trainable,
        "group_size": point["group_size"],
        "completions": completions,
        "completion_tokens": point["completion_tokens"],
        "step_s": round(statistics.median(step_s), 4),
        "rollout_s": round(statistics.median(samples["rollout_s"]), 4),
        "train_s": round(statistics.median(samples["train_s"]), 4),
        "train_breakdown_s": {k: round(statistics.median(s[k] for s in spans), 4) for k in spans[0]},
        "rollout_tokens_per_s": round(
            completions * point["completion_tokens"] / statistics.median(samples["rollout_s"]), 1
        ),
        "peak_rss_mb": round(peaks.get(me, 0.0), 1),
        "children_peak_rss_mb": round(sum(v for pid, v in peaks.items() if pid != me), 1),
        "peak_rss_reset_after_warmup": memory["reset"],
        "load_and_warmup_peak_rss_mb": round(memory["before"].get(me, 0.0), 1),
        "registered_rss_mb": round(memory["registered_rss_mb"], 1),
        "dtype": str(resolve_dtype(config.dtype, torch.device("cpu"))).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }


def worker(job: dict[str, Any]) -> None:
    """Run one point in this fresh process and print its record as the last line."""
    import torch

    if job["threads"] is not None:
        torch.set_num_threads(job["threads"])
    point = dict(job["point"], groups=job["groups"])
    point["model_dir"] = str(model_dir(point["size"], Path(job["models"])))
    print(json.dumps(asyncio.run(run_point(point, job))))


def grid(axes: dict[str, list[Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The base point (each axis's middle value) and every point that varies one axis from it, base first."""
    base = {axis: values[(len(values) - 1) // 2] for axis, values in axes.items()}
    points = [base]
    for axis, values in axes.items():
        points += [dict(base, **{axis: value}) for value in values if value != base[axis]]
    return base, points


def run_worker(point: dict[str, Any], job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One point in a fresh ``--worker`` process; its record."""
    request = json.dumps({**job, "point": point})
    done = subprocess.run(
        [sys.executable, __file__, "--worker", request],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"point {point} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def plot(records: list[dict[str, Any]], base: dict[str, Any], axes: dict[str, list[Any]], path: Path) -> None:
    """Top row: step, rollout and train seconds against each axis; bottom row: the worker's peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(2, len(axes), figsize=(4.5 * len(axes), 7), squeeze=False)
    others = {axis: [a for a in axes if a != axis] for axis in axes}
    for column, (axis, values) in enumerate(axes.items()):
        row = [
            next(r for r in records if r[axis] == v and all(r[o] == base[o] for o in others[axis]))
            for v in values
        ]
        x = [r["parameters"] / 1e6 for r in row] if axis == "size" else values
        times, memory = panels[0][column], panels[1][column]
        for key, style in (("step_s", "o-"), ("rollout_s", "s--"), ("train_s", "^--")):
            times.plot(x, [r[key] for r in row], style, label=key.removesuffix("_s"))
        memory.plot(x, [r["peak_rss_mb"] + r["children_peak_rss_mb"] for r in row], "o-")
        fixed = ", ".join(f"{o}={base[o]}" for o in others[axis])
        label = "parameters (M)" if axis == "size" else axis.replace("_", " ")
        for panel in (times, memory):
            panel.set_xlabel(label)
            panel.set_xscale("log", base=10 if axis == "size" else 2)
            names = [f"{r['size']}\n{v:.1f}M" for r, v in zip(row, x, strict=True)]
            panel.set_xticks(x, names if axis == "size" else x)
            panel.set_title(fixed, fontsize=9)
            panel.minorticks_off()
            panel.set_ylim(0, 1.1 * max(line.get_ydata().max() for line in panel.get_lines()))
        times.set_ylabel("seconds per RL step (median)")
        times.legend()
        memory.set_ylabel("peak RSS of the worker (MiB)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("scaling.png"), help="the PNG to write")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 points (tiny, small), 1 step each")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per point [5; quick 1]")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--groups", type=int, default=None, help="prompts per step [2; quick 1]")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--dtype", default="auto", help="TrainerConfig.dtype [auto]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=Path, default=None, help="keep the random model here [temp dir]")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    axes = QUICK if args.quick else FULL
    base, points = grid(axes)
    with tempfile.TemporaryDirectory() as scratch:
        job = {
            "steps": args.steps or (1 if args.quick else 5),
            "warmup": args.warmup,
            "groups": args.groups or (1 if args.quick else 2),
            "mode": args.mode,
            "dtype": args.dtype,
            "threads": args.threads,
            "seed": args.seed,
            "models": str(args.models or scratch),
        }
        Path(job["models"]).mkdir(parents=True, exist_ok=True)
        started, loads, records = time.monotonic(), [os.getloadavg()[0]], []
        for point in points:
            records.append(run_worker(point, job, timeout_s=900))
            loads.append(os.getloadavg()[0])
            print(json.dumps(records[-1]), file=sys.stderr)
    plot(records, base, axes, args.output)
    figures = {
        "bench": "scaling",
        "device": "cpu",
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        **{key: job[key] for key in ("mode", "dtype", "groups", "steps", "warmup")},
        "base": base,
        "axes": axes,
        "points": records,
        "wall_s": round(time.monotonic() - started, 1),
        "load_avg_1min": [round(load, 2) for load in loads],
        "png": str(args.output),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

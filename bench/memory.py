"""Peak memory of one training step against model size and sequence length, per option, beside plan_memory.

Each (size, sequence length, LoRA or full, activation checkpointing, a NF4/int8 LoRA base where bitsandbytes
runs on this CPU) runs in a fresh process
(``python -m art_local.training.measure_memory``): random-init Llama-style weights, one packed row, one
forward/backward and one AdamW step on CPU in fp32. "measured" is that process's peak RSS minus its RSS before
the weights loaded (the loader's transient peak excluded); "estimated" is ``art_local.plan_memory`` for the same
setting. Prints one JSON line and writes one PNG.

    .venv/bin/python bench/memory.py --sizes small,medium --png memory.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# name → (hidden, intermediate, layers, heads, kv heads, vocab, sequence lengths measured)
SIZES: dict[str, tuple[int, int, int, int, int, int, tuple[int, ...]]] = {
    "small": (512, 1408, 8, 8, 4, 8192, (256, 1024)),
    "medium": (768, 2048, 12, 12, 4, 16384, (256,)),
    "large": (1024, 2816, 16, 16, 4, 32000, (256,)),
}
# name → (LoRA rank or None for full, activation checkpointing, quantization of the LoRA base)
OPTIONS = [
    ("lora", 8, False, "none"),
    ("lora+ckpt", 8, True, "none"),
    ("lora+nf4", 8, False, "nf4"),  # the quantized ones run only where bitsandbytes works on CPU
    ("lora+int8", 8, False, "int8"),
    ("full", None, False, "none"),
    ("full+ckpt", None, True, "none"),
]


def build(directory: Path, size: str) -> Path:
    """Save the random model of ``size`` under ``directory`` (once)."""
    from art_local.training.measure_memory import save_random_model

    hidden, mlp, layers, heads, kv_heads, vocab, _ = SIZES[size]
    target = directory / size
    if not (target / "config.json").exists():
        save_random_model(
            target,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            max_position_embeddings=4096,
        )
    return target


def run_one(
    model_dir: Path, sequence_length: int, lora_rank: int | None, checkpointing: bool, quantization: str
) -> dict[str, Any]:
    """One fresh process's figures for one setting."""
    request = {
        "model_dir": str(model_dir),
        "rows": 1,
        "sequence_length": sequence_length,
        "trainer_config": {
            "lora_rank": lora_rank,
            "activation_checkpointing": checkpointing,
            "quantization": quantization,
        },
    }
    completed = subprocess.run(
        [sys.executable, "-m", "art_local.training.measure_memory", json.dumps(request)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure_all(sizes: list[str], directory: Path) -> list[dict[str, Any]]:
    """Every (size, length, option) record: measured and estimated bytes."""
    from art_local import plan_memory
    from art_local.training import TrainerConfig
    from art_local.training.quantize import quantization_available

    options = [option for option in OPTIONS if option[3] == "none" or quantization_available("cpu")]
    records = []
    for size in sizes:
        model_dir = build(directory, size)
        for sequence_length in SIZES[size][-1]:
            for option, lora_rank, checkpointing, quantization in options:
                measured = run_one(model_dir, sequence_length, lora_rank, checkpointing, quantization)
                config = TrainerConfig(
                    lora_rank=lora_rank,
                    activation_checkpointing=checkpointing,
                    quantization=quantization,  # type: ignore[arg-type]
                )
                plan = plan_memory(
                    model_dir,
                    sequence_length=sequence_length,
                    batch_rows=1,
                    trainer_config=config,
                    device="cpu",
                )
                record = {
                    "size": size,
                    "parameters": plan.parameters,
                    "sequence_length": sequence_length,
                    "option": option,
                    "measured_bytes": measured["training_bytes"],
                    "estimated_bytes": plan.total_bytes,
                }
                print(json.dumps(record), file=sys.stderr)
                records.append(record)
    return records


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """One panel per size: GiB against sequence length, solid = measured, dashed = estimated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(record["size"] for record in records))
    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for axis, size in zip(axes[0], sizes, strict=True):
        rows = [record for record in records if record["size"] == size]
        for index, (option, _, _, _) in enumerate(OPTIONS):
            mine = [record for record in rows if record["option"] == option]
            if not mine:
                continue
            lengths = [record["sequence_length"] for record in mine]
            color = f"C{index}"
            axis.plot(lengths, [r["measured_bytes"] / 2**30 for r in mine], "o-", color=color, label=option)
            axis.plot(lengths, [r["estimated_bytes"] / 2**30 for r in mine], "x--", color=color)
        axis.set_title(f"{size} ({rows[0]['parameters'] / 1e6:.0f}M params)")
        axis.set_xlabel("sequence length (1 row)")
        axis.set_ylabel("peak GiB (solid measured, dashed plan_memory)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--png", default="memory.png")
    parser.add_argument(
        "--models", default=None, help="directory for the random models (default: a temp dir)"
    )
    arguments = parser.parse_args()
    sizes = arguments.sizes.split(",")
    unknown = [size for size in sizes if size not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    with tempfile.TemporaryDirectory() as scratch:
        records = measure_all(sizes, Path(arguments.models or scratch))
    plot(records, Path(arguments.png))
    print(json.dumps({"device": "cpu", "dtype": "float32", "png": arguments.png, "records": records}))


if __name__ == "__main__":
    main()

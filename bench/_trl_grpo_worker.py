"""TRL's side of ``bench/rl_step_vs_trl.py``; runs in the interpreter that has TRL (never imports art).

Reads a JSON job on argv[1], builds the trainer, prints ``{"ready": true}`` and then runs one optimizer step
per ``go`` line on stdin, printing ``{"step_s": ...}`` after each: the wall time from the ``go`` to the step's
``on_step_end`` (dataloader + generation + reward + loss + backward + AdamW). After the last step it prints TRL's
version. Between steps it blocks on stdin, so the parent can run its own side while this one is idle.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any


def main(job: dict[str, Any]) -> None:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if job.get("threads"):
        torch.set_num_threads(job["threads"])

    def wait_for_go() -> float:
        line = sys.stdin.readline()
        if line.strip() != "go":  # EOF: the parent is gone
            raise SystemExit(f"expected 'go' on stdin, got {line!r}")
        return time.perf_counter()

    def say(message: dict[str, Any]) -> None:
        print(json.dumps(message), flush=True)

    class Lockstep(TrainerCallback):
        started = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            say({"ready": True})
            self.started = wait_for_go()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            say({"step_s": time.perf_counter() - self.started})
            if state.global_step < state.max_steps:
                self.started = wait_for_go()

    rewards = random.Random(job["seed"])

    def random_reward(completions: list[Any], **kwargs: Any) -> list[float]:
        return [rewards.random() for _ in completions]  # every group has signal, as on our side

    # fp32 unless the job asks for TRL's own defaults (bf16 autocast, gradient checkpointing, the model's dtype)
    precision: dict[str, Any] = (
        {}
        if job.get("trl_defaults")
        else {
            "bf16": False,  # TRL defaults to bf16: 18x slower backward on CPUs without native bf16 (docs/architecture.md §6)
            "fp16": False,
            "gradient_checkpointing": False,  # TRL defaults to True; off is faster for models this small
            "model_init_kwargs": {"dtype": torch.float32},
        }
    )
    config = GRPOConfig(
        output_dir=job["output_dir"],
        per_device_train_batch_size=job["completions_per_step"],
        gradient_accumulation_steps=1,
        num_generations=job["group_size"],
        max_completion_length=job["completion_tokens"],
        generation_kwargs={"min_new_tokens": job["completion_tokens"]},  # exactly N tokens, like ignore_eos
        temperature=1.0,
        max_steps=job["max_steps"],
        learning_rate=job["learning_rate"],
        lr_scheduler_type="constant",
        beta=0.0,  # no reference model (TRL's default; ours has no KL either)
        use_cpu=job["device"] == "cpu",
        shuffle_dataset=False,
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=job["seed"],
        **precision,
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in job["prompts"]])
    trainer = GRPOTrainer(
        model=job["model_dir"],
        reward_funcs=random_reward,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(job["model_dir"]),
        callbacks=[Lockstep()],
    )
    trainer.train()
    say(
        {
            "trl_version": trl.__version__,
            "torch_threads": torch.get_num_threads(),
            "bf16": bool(config.bf16),
            "gradient_checkpointing": bool(config.gradient_checkpointing),
        }
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

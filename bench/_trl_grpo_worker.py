"""TRL's side of ``bench/rl_step_vs_trl.py``; runs in the interpreter that has TRL (never imports art).

Reads a JSON job on argv[1] and prints one JSON line: TRL's version and the wall time of each optimizer step
(generation + reward + loss + backward + AdamW), measured between consecutive ``on_step_end`` callbacks.
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
    marks: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    rewards = random.Random(job["seed"])

    def random_reward(completions: list[Any], **kwargs: Any) -> list[float]:
        return [rewards.random() for _ in completions]  # every group has signal, as on our side

    config = GRPOConfig(
        output_dir=job["output_dir"],
        per_device_train_batch_size=job["completions_per_step"],
        gradient_accumulation_steps=1,
        num_generations=job["group_size"],
        max_completion_length=job["completion_tokens"],
        generation_kwargs={"min_new_tokens": job["completion_tokens"]},  # exactly N tokens, like ignore_eos
        temperature=1.0,
        max_steps=job["warmup"] + job["steps"],
        learning_rate=job["learning_rate"],
        lr_scheduler_type="constant",
        beta=0.0,  # no reference model (TRL's default; ours has no KL either)
        bf16=False,  # TRL defaults to bf16: 18x slower backward on CPUs without native bf16 (ARCHITECTURE §6)
        fp16=False,
        gradient_checkpointing=False,  # TRL defaults to True; off is faster for models this small
        model_init_kwargs={"dtype": torch.float32},
        use_cpu=job["device"] == "cpu",
        shuffle_dataset=False,
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=job["seed"],
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in job["prompts"]])
    trainer = GRPOTrainer(
        model=job["model_dir"],
        reward_funcs=random_reward,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(job["model_dir"]),
        callbacks=[StepTimer()],
    )
    trainer.train()
    step_s = [later - earlier for earlier, later in zip(marks, marks[1:], strict=False)]
    print(
        json.dumps(
            {"trl_version": trl.__version__, "step_s": step_s, "torch_threads": torch.get_num_threads()}
        )
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

"""Quickstart: teach a tiny model to sort three letters with SFT then RL, end to end on this machine.

Usage: ``python examples/quickstart.py [--steps 200] [--output .art]`` (``--steps 3`` for a smoke run).
"""

import argparse
import asyncio
import random

from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

import art_core as art
from art_local import LocalBackend
from art_local.demo import Triple, WarmStartConfig, format_trajectories, prompt, reward, split_triples
from art_local.tiny import build_tiny_model
from art_local.training import TrainerConfig


async def rollout(
    client: AsyncOpenAI, model: art.TrainableModel, letters: Triple, temperature: float = 1.0
) -> art.Trajectory:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt(letters)}]
    completion = await client.chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,
        max_tokens=8,
        temperature=temperature,
        logprobs=True,
    )
    choice = completion.choices[0]
    return art.Trajectory(
        messages_and_choices=[*messages, choice], reward=reward(letters, choice.message.content)
    )


async def main(steps: int, output: str) -> None:
    backend = LocalBackend(output, trainer_config=TrainerConfig(lora_rank=None))  # full fine-tune
    model = art.TrainableModel(name="quickstart", project="sort", base_model=str(build_tiny_model("tiny")))
    await model.register(backend)  # an offline tiny model; starts the OpenAI-compatible server
    # Step 1, a format-only warm start: SFT on 3-letter answers in random order (the format, not sorting).
    if await model.get_step() == 0:
        data = format_trajectories(WarmStartConfig())  # 500 batches of 32 conversations
        sft = await backend.train_sft(model, data, learning_rate=3e-3, batch_size=32, schedule="constant")
        await model.log(metrics=sft.metrics, step=sft.step)
    client = model.openai_client()
    train, val = split_triples()

    for _ in range(await model.get_step(), steps):  # RL from the SFT step; resumes where a run stopped
        groups = await art.gather_trajectory_groups(  # 8 prompts x 8 samples, all concurrent
            art.TrajectoryGroup(rollout(client, model, letters) for _ in range(8))
            for letters in random.sample(train, 8)
        )
        # An explicit learning rate: the 5e-6 default suits LoRA on billion-parameter models, not this one.
        result = await backend.train(model, groups, learning_rate=1e-3)
        await model.log(groups, metrics=result.metrics, step=result.step)

        if result.step % 10 == 0 or result.step == steps:  # greedy answers to 100 held-out prompts
            val_groups = await art.gather_trajectory_groups(
                art.TrajectoryGroup([rollout(client, model, letters, temperature=0.0)]) for letters in val
            )
            await model.log(val_groups, split="val", step=result.step)
            await model.delete_checkpoints("val/reward")  # keep the latest and the best
            accuracy = sum(g.trajectories[0].reward for g in val_groups) / len(val_groups)
            print(f"step {result.step}: val/reward {accuracy:.2f}")

    await backend.close()
    print(f"history: {model.output_dir()}/history.jsonl; plot: art history {model.output_dir()} --plot r.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="RL on 'sort three letters' with a tiny local model.")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output", default=".art")
    args = parser.parse_args()
    asyncio.run(main(args.steps, args.output))

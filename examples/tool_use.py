"""Multi-turn tool use with RL: the model calls ``get_weather`` through OpenAI tool calls, then answers.

Episode: the user asks "What is the temperature in Oslo today?"; the model should call
``get_weather({"city": "Oslo"})``, read the tool's reply ("21 degrees in Oslo") and answer "21 degrees".
The environment scores the whole episode: 0.2 for a well-formed tool call, +0.3 if it asked about the right city,
+0.5 if the final answer states the temperature the tool returned.

The tiny offline model first gets a format-only warm start (SFT where the call names a *random* city and the
answer a *random* number): it learns the shape of an episode, and what is left for RL is which city to ask about
and which number to report. This example is about the mechanics (multi-turn tool calls through the OpenAI API,
every sampled turn trained, the environment scoring the episode); the 0.2M-parameter model does not get
measurably better at the content within minutes (measured: the right city stays near chance, about 10 %, over
60 steps), so point ``base_model`` at a real model to see the reward climb.

    python examples/tool_use.py                                   # 30 steps, one line per step
    python examples/tool_use.py --steps 2 --warm-start-steps 100  # the smoke run CI does
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
from typing import Any

from openai import AsyncOpenAI

import art_core as art
from art_local import LocalBackend
from art_local.tiny import build_tiny_model
from art_local.training import TrainerConfig

CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lima", "Cairo", "Delhi")
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The temperature in a city today",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def question(city: str) -> list[Any]:
    return [{"role": "user", "content": f"What is the temperature in {city} today?"}]


def get_weather(arguments: str, temperatures: dict[str, int]) -> tuple[str, str | None]:
    """The tool: (reply for the model, city asked about or None when the arguments are malformed)."""
    try:
        city = json.loads(arguments)["city"]
    except (ValueError, KeyError, TypeError):
        return 'error: call get_weather with {"city": "<name>"}', None
    if city not in temperatures:
        return f"error: unknown city {city!r}", str(city)
    return f"{temperatures[city]} degrees in {city}", str(city)


async def rollout(client: AsyncOpenAI, model: art.TrainableModel, city: str, seed: int) -> art.Trajectory:
    """One episode of at most three assistant turns; every sampled turn is trained."""
    temperatures = {name: random.Random(f"{seed}-{name}").randint(-10, 35) for name in CITIES}
    trajectory = art.Trajectory(messages_and_choices=question(city), tools=TOOLS)
    asked: str | None = None
    answer: str | None = None
    for _ in range(3):
        completion = await client.chat.completions.create(
            model=model.get_inference_name(),
            messages=trajectory.messages(),
            tools=TOOLS,
            max_tokens=32,
            logprobs=True,
        )
        choice = completion.choices[0]
        trajectory.messages_and_choices.append(choice)
        if not choice.message.tool_calls:
            answer = choice.message.content or ""
            break
        for call in choice.message.tool_calls:
            reply, asked = get_weather(call.function.arguments, temperatures)  # type: ignore[union-attr]
            trajectory.messages_and_choices.append(
                {"role": "tool", "tool_call_id": call.id, "content": reply}
            )
    number = re.search(r"-?\d+", answer or "")
    trajectory.reward = (
        0.2 * (asked is not None)
        + 0.3 * (asked == city)
        + 0.5 * (asked == city and number is not None and int(number.group()) == temperatures[city])
    )
    trajectory.metrics["right_city"] = asked == city
    return trajectory


def format_trajectory(rng: random.Random) -> art.Trajectory:
    """Warm-start conversation: a well-formed call about a random city, then a random number (format only)."""
    called, reported = rng.choice(CITIES), rng.randint(-10, 35)
    call = {
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": called})},
    }
    turns = [
        *question(rng.choice(CITIES)),
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": f"{rng.randint(-10, 35)} degrees in {called}"},
        {"role": "assistant", "content": f"{reported} degrees"},
    ]
    return art.Trajectory(messages_and_choices=turns, tools=TOOLS)


async def main(steps: int, warm_start_steps: int, learning_rate: float, output: str) -> None:
    backend = LocalBackend(output, trainer_config=TrainerConfig(lora_rank=None))
    model = art.TrainableModel(name="weather", project="tool-use", base_model=str(build_tiny_model("tiny")))
    await model.register(backend)
    if await model.get_step() == 0:  # step 1: format-only SFT (a call about a random city, a random number)
        rng = random.Random(0)
        data = [format_trajectory(rng) for _ in range(warm_start_steps * 16)]
        sft = await backend.train_sft(model, data, learning_rate=3e-3, batch_size=16, schedule="constant")
        await model.log(metrics=sft.metrics, step=sft.step)
        print(f"step {sft.step}: SFT loss {sft.metrics['loss/sft']:.3f}", flush=True)
    client = model.openai_client()
    for step in range(await model.get_step(), steps + 1):  # then `steps` RL steps
        groups = await art.gather_trajectory_groups(  # a group: 8 episodes of the same scenario
            art.TrajectoryGroup(rollout(client, model, city, seed=step * 10 + k) for _ in range(8))
            for k, city in enumerate(random.sample(CITIES, 4))
        )
        result = await backend.train(model, groups, learning_rate=learning_rate)
        await model.log(groups, metrics=result.metrics, step=result.step)
        trajectories = [t for g in groups for t in g.trajectories]
        mean = sum(t.reward for t in trajectories) / len(trajectories)
        right = sum(bool(t.metrics["right_city"]) for t in trajectories) / len(trajectories)
        print(f"step {result.step}: reward {mean:.3f}, right city {right:.0%}", flush=True)
    await model.delete_checkpoints("train/reward")
    await backend.close()
    print(f"history: {model.output_dir() / 'history.jsonl'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="RL steps")
    parser.add_argument(
        "--warm-start-steps", type=int, default=300, help="format-only SFT steps (batches of 16)"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="RL learning rate (full fine-tune)")
    parser.add_argument("--output", default=".art", help="where history, trajectories and checkpoints go")
    args = parser.parse_args()
    asyncio.run(main(args.steps, args.warm_start_steps, args.learning_rate, args.output))

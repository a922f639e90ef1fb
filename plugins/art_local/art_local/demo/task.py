"""The demo task: sort three distinct letters from a–j (plugins/art_local/DEMO.md); the reward is exact-match accuracy."""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING, Any

import art_core as art

if TYPE_CHECKING:
    from openai import AsyncOpenAI

LETTERS = "abcdefghij"
NUM_VAL = 100
_VAL_SEED = 20240917  # the held-out triples never depend on the run's seed

Triple = tuple[str, str, str]


def all_triples() -> list[Triple]:
    """The 720 ordered triples of distinct letters a–j."""
    return [(a, b, c) for a, b, c in itertools.permutations(LETTERS, 3)]


def split_triples() -> tuple[list[Triple], list[Triple]]:
    """(train, val): 100 fixed triples are held out of the warm start and of RL."""
    triples = all_triples()
    held_out = set(random.Random(_VAL_SEED).sample(triples, NUM_VAL))
    train = [t for t in triples if t not in held_out]
    val = [t for t in triples if t in held_out]
    return train, val


def prompt(triple: Triple) -> str:
    """``Sort these letters: d a c``."""
    return f"Sort these letters: {' '.join(triple)}"


def messages(triple: Triple) -> list[dict[str, Any]]:
    """The one-turn conversation a rollout sends."""
    return [{"role": "user", "content": prompt(triple)}]


def answer(triple: Triple) -> str:
    """The correct answer: the letters sorted, no spaces (``acd``)."""
    return "".join(sorted(triple))


def reward(triple: Triple, content: str | None) -> float:
    """1.0 iff the stripped answer is exactly the sorted letters, else 0.0."""
    return 1.0 if (content or "").strip() == answer(triple) else 0.0


async def rollout(
    client: AsyncOpenAI, model: str, triple: Triple, *, temperature: float = 1.0, max_tokens: int = 8
) -> art.Trajectory:
    """Ask the model once through the OpenAI API and score its answer."""
    conversation = messages(triple)
    completion = await client.chat.completions.create(
        model=model,
        messages=conversation,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=temperature,
        logprobs=True,
    )
    choice = completion.choices[0]
    return art.Trajectory(
        messages_and_choices=[*conversation, choice],
        reward=reward(triple, choice.message.content),
        metadata={"letters": " ".join(triple), "answer": (choice.message.content or "").strip()},
    )

"""What the conformance kit observes of a backend from outside: seeded samples, raw HTTP statuses, statistics.

The statistics are exact binomial tails with a bound of 1e-12 per token: a healthy backend fails them less than once in a
million runs even over a million-token vocabulary, and the kit's requests are seeded besides, so a result repeats.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI
from openai.types.chat.chat_completion import Choice

import art_core as art

# A healthy backend trips a statistical check with at most this probability.
FALSE_ALARM = 1e-12


@dataclass(frozen=True)
class Sample:
    """One completion as the endpoint reported it: its ``token_id:<id>`` tokens, their logprobs, the Choice."""

    prompt: str
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    choice: Choice

    @property
    def first(self) -> str:
        return self.tokens[0]

    def trajectory(self, reward: float) -> art.Trajectory:
        return art.Trajectory(
            messages_and_choices=[{"role": "user", "content": self.prompt}, self.choice], reward=reward
        )


async def sample_many(
    client: AsyncOpenAI,
    name: str,
    prompt: str,
    count: int,
    *,
    max_tokens: int,
    temperature: float,
    seed: int,
) -> list[Sample]:
    """``count`` concurrent completions with seeds ``seed, seed + 1, ...`` and ``logprobs=True``."""

    async def one(index: int) -> Sample:
        completion = await client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=temperature,
            logprobs=True,
            seed=seed + index,
        )
        choice = completion.choices[0]
        content = choice.logprobs.content if choice.logprobs is not None else None
        if not content:
            raise AssertionError(
                f"{name!r} answered without logprobs although logprobs=True was asked; every backend reports "
                "one 'token_id:<id>' entry per sampled token"
            )
        return Sample(prompt, tuple(e.token for e in content), tuple(e.logprob for e in content), choice)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def first_token_logprobs(samples: Sequence[Sample]) -> dict[str, list[float]]:
    """Every reported logprob of each first token (the same prompt: each list should hold one value)."""
    found: dict[str, list[float]] = {}
    for sample in samples:
        found.setdefault(sample.first, []).append(sample.logprobs[0])
    return found


def most_common_first_token(samples: Sequence[Sample]) -> str:
    counts = first_token_logprobs(samples)
    return max(counts, key=lambda token: (len(counts[token]), token))


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _log_binomial_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    log_choose = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    return log_choose + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_tail(count: int, trials: int, p: float) -> float:
    """The probability of a count at least this far from ``trials * p``, on its side (one-sided exact tail)."""
    p = min(max(p, 0.0), 1.0)
    ks = range(count, trials + 1) if count >= trials * p else range(0, count + 1)
    logs = [_log_binomial_pmf(k, trials, p) for k in ks]
    top = max(logs)
    return 0.0 if top == -math.inf else math.exp(top) * math.fsum(math.exp(v - top) for v in logs)


def frequency_problems(samples: Sequence[Sample]) -> list[str]:
    """How the reported first-token logprobs disagree with how often each first token was sampled (temperature 1).

    The sampled tokens' reported probabilities cannot sum over 1, and each token's count must be a plausible
    draw from its reported probability: its exact binomial tail is over ``FALSE_ALARM``, a bound loose enough
    to hold over a whole vocabulary at once.
    """
    by_token = first_token_logprobs(samples)
    trials = len(samples)
    probabilities = {token: math.exp(median(values)) for token, values in by_token.items()}
    problems = []
    mass = math.fsum(probabilities.values())
    if mass > 1.02:
        problems.append(
            f"the {len(by_token)} distinct first tokens sampled have reported probabilities summing to "
            f"{mass:.3f} > 1"
        )
    for token, probability in sorted(probabilities.items()):
        count = len(by_token[token])
        tail = binomial_tail(count, trials, probability)
        if tail < FALSE_ALARM:
            problems.append(
                f"{token} was sampled first {count} times in {trials} but its reported probability is "
                f"{probability:.4g} (chance of a count this far off: {tail:.2g})"
            )
    return problems


def consistency_problems(samples: Sequence[Sample], tolerance: float) -> list[str]:
    """First tokens reported with different logprobs in different calls (same prompt, same step)."""
    return [
        f"{token} after the same prompt was reported with logprobs from {min(v):.4f} to {max(v):.4f}"
        for token, v in sorted(first_token_logprobs(samples).items())
        if max(v) - min(v) > tolerance
    ]


async def http_status(
    method: str, url: str, *, api_key: str | None, body: dict[str, Any] | None = None
) -> int:
    """The status of one raw request (no OpenAI client, no retries): what any HTTP client would see."""
    import httpx

    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(timeout=60.0) as client:
        response = await client.request(method, url, headers=headers, json=body)
        return response.status_code

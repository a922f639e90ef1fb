"""The bigram letter policy and one policy-gradient step on it, as pure functions on plain lists (no torch).

The policy ignores the prompt: the next letter depends only on the previous one. That is all a toy needs to show
what a backend does with art_core's advantages (``art_core.advantages``) and the RL loss of docs/rl-math.md §3.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz "
EOS = len(LETTERS)  # token id of the end token
VOCAB = EOS + 1  # output tokens: 26 letters, space, end
BOS = VOCAB  # the context row of the first token
Table = list[list[float]]  # logits_CV: one row of VOCAB logits per context (BOS + every token)


def initial_table() -> Table:
    """The untrained policy: uniform after every context."""
    return [[0.0] * VOCAB for _ in range(VOCAB + 1)]


def softmax(logits: Sequence[float], temperature: float = 1.0) -> list[float]:
    scaled = [value / temperature for value in logits]
    top = max(scaled)
    exps = [math.exp(value - top) for value in scaled]
    total = math.fsum(exps)
    return [value / total for value in exps]


def sample(
    table: Table, max_tokens: int, temperature: float, rng: random.Random
) -> tuple[list[int], list[float]]:
    """Token ids until the end token or ``max_tokens``, with their untempered logprobs (what gets trained)."""
    ids: list[int] = []
    logprobs: list[float] = []
    context = BOS
    while len(ids) < max_tokens:
        weights = softmax(table[context], max(temperature, 1e-3))
        token = rng.choices(range(VOCAB), weights=weights)[0]
        ids.append(token)
        logprobs.append(math.log(softmax(table[context])[token]))
        if token == EOS:
            break
        context = token
    return ids, logprobs


def text(ids: Sequence[int]) -> str:
    return "".join(LETTERS[token] for token in ids if token != EOS)


@dataclass(frozen=True)
class Completion:
    """One sampled answer as a trainer sees it: token ids, sampler logprobs, advantage and token weight."""

    token_ids: tuple[int, ...]
    old_logprobs: tuple[float, ...]
    advantage: float
    weight: float


@dataclass(frozen=True)
class LossConfig:
    """The common loss options of ``train()`` (docs/rl-math.md §3); ε defaults per PPO or CISPO."""

    ppo: bool = False
    epsilon: float | None = None
    epsilon_high: float | None = None
    importance_sampling_level: str = "token"

    def clip_range(self) -> tuple[float, float]:
        low = self.epsilon if self.epsilon is not None else (0.2 if self.ppo else 1.0)
        high = self.epsilon_high if self.epsilon_high is not None else (low if self.ppo else 4.0)
        return 1.0 - low, 1.0 + high


def _ratio(token_ratio: float, sequence_ratio: float, level: str) -> float:
    if level == "sequence":
        return sequence_ratio
    if level == "average":
        return (token_ratio + sequence_ratio) / 2
    if level == "geometric_average":
        return math.sqrt(token_ratio * sequence_ratio)
    return token_ratio


def policy_gradient(
    table: Table, completions: Sequence[Completion], loss: LossConfig
) -> tuple[Table, float, int]:
    """The ascent direction of the RL objective over ``table``, the loss and the number of trained tokens.

    The importance ratio is a constant weight per token (as in CISPO); PPO drops tokens whose ratio is clipped.
    """
    low, high = loss.clip_range()
    gradient_CV = [[0.0] * VOCAB for _ in table]
    total_loss = 0.0
    tokens = sum(len(c.token_ids) for c in completions)
    for completion in completions:
        contexts = [BOS, *completion.token_ids[:-1]]
        probs = [softmax(table[context]) for context in contexts]
        deltas = [
            math.log(p[token]) - old
            for p, token, old in zip(probs, completion.token_ids, completion.old_logprobs, strict=True)
        ]
        sequence_ratio = math.exp(math.fsum(deltas) / len(deltas))
        for context, p, token, delta in zip(contexts, probs, completion.token_ids, deltas, strict=True):
            ratio = _ratio(math.exp(delta), sequence_ratio, loss.importance_sampling_level)
            clipped = min(max(ratio, low), high)
            advantage = completion.advantage
            if loss.ppo:
                coefficient = ratio * advantage if ratio * advantage <= clipped * advantage else 0.0
                total_loss -= min(ratio * advantage, clipped * advantage) * completion.weight
            else:
                coefficient = clipped * advantage
                total_loss -= clipped * advantage * math.log(p[token]) * completion.weight
            for index in range(VOCAB):  # d log p(token) / d logit = onehot − p
                gradient_CV[context][index] += coefficient * completion.weight * ((index == token) - p[index])
    scale = 1.0 / (tokens + 1e-6)
    return [[g * scale for g in row] for row in gradient_CV], total_loss * scale, tokens


def ascend(
    table: Table, gradient_CV: Table, learning_rate: float, max_grad_norm: float | None
) -> tuple[Table, float]:
    """``table + learning_rate · gradient``, the gradient clipped to ``max_grad_norm``; returns the raw norm."""
    norm = math.sqrt(math.fsum(g * g for row in gradient_CV for g in row))
    scale = min(1.0, max_grad_norm / norm) if max_grad_norm is not None and norm > 0 else 1.0
    updated = [
        [value + learning_rate * scale * g for value, g in zip(row, grads, strict=True)]
        for row, grads in zip(table, gradient_CV, strict=True)
    ]
    return updated, norm

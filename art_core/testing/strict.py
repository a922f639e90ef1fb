"""``StrictBackend``: a small, real, in-memory reference backend that validates every input hard.

It trains a context-free softmax policy over 26 letters, a space and an end token in pure Python with the same
advantage and token-weight maths as every other backend (``art_core.advantages``), and serves it through a
stdlib OpenAI-compatible HTTP endpoint. Use it to test a training loop without torch::

    backend = StrictBackend()
    model = art.TrainableModel(name="agent", project="p", base_model="strict-letters")
    await model.register(backend)
    ...  # rollouts through model.openai_client(), then backend.train(model, groups, learning_rate=0.5)
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from art_core.advantages import group_advantages, is_trainable_group, normalize_batch
from art_core.backend import ImportanceSamplingLevel
from art_core.results import TrainResult
from art_core.testing.strict_server import StrictServer
from art_core.train_options import TrainOptions
from art_core.trajectories import TrajectoryGroup, check_groups, is_choice

if TYPE_CHECKING:
    from art_core.model import Model, TrainableModel

LETTERS = "abcdefghijklmnopqrstuvwxyz "
EOS_ID = len(LETTERS)
VOCAB_SIZE = len(LETTERS) + 1
BASE_MODEL = "strict-letters"


def softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(value - top) for value in logits]
    total = math.fsum(exps)
    return [value / total for value in exps]


@dataclass
class StrictStorage:
    """Where a StrictBackend keeps its state; share one between instances to simulate a restart."""

    checkpoints: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _parse_token_id(token: str, where: str) -> int:
    prefix, _, raw = token.partition(":")
    if prefix != "token_id" or not raw.isdigit():
        raise ValueError(
            f"{where}: logprob token {token!r} is not 'token_id:<id>'; sample with logprobs=True"
        )
    token_id = int(raw)
    if token_id >= VOCAB_SIZE:
        raise ValueError(f"{where}: token id {token_id} is outside the vocabulary of {VOCAB_SIZE}")
    return token_id


@dataclass(frozen=True)
class _Sample:
    token_ids: list[int]
    old_logprobs: list[float]
    advantage: float


class StrictBackend:
    """The reference backend: every option of the common subset, validated, with a visible effect."""

    def __init__(self, storage: StrictStorage | None = None, *, seed: int = 0) -> None:
        self.storage = storage or StrictStorage()
        self.seed = seed
        self._server: StrictServer | None = None
        self._models: dict[str, Model] = {}

    # -- Backend -------------------------------------------------------------------------------------------

    async def register(self, model: Model) -> None:
        if model.trainable and getattr(model, "base_model", BASE_MODEL) != BASE_MODEL:
            raise ValueError(f"StrictBackend only trains base_model={BASE_MODEL!r}, not {model.base_model!r}")  # type: ignore[attr-defined]
        self._models[model.name] = model
        with self.storage.lock:
            self.storage.checkpoints.setdefault(model.name, {0: [0.0] * VOCAB_SIZE})

    async def close(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
            self._server = None

    async def _get_step(self, model: TrainableModel) -> int:
        return max(self._checkpoints(model.name))

    async def _delete_checkpoint_files(self, model: TrainableModel, steps_to_keep: list[int]) -> None:
        keep = set(steps_to_keep)
        with self.storage.lock:
            checkpoints = self.storage.checkpoints[model.name]
            for step in [s for s in checkpoints if s not in keep]:
                del checkpoints[step]

    def _model_inference_name(self, model: Model, step: int | None = None) -> str:
        return model.name if step is None else f"{model.name}@{step}"

    async def _prepare_backend_for_training(self, model: TrainableModel) -> tuple[str, str]:
        if self._server is None:
            self._server = StrictServer(self._sample, self._served)
            await asyncio.to_thread(self._server.start)
        return self._server.base_url, self._server.api_key

    def _checkpoints(self, name: str) -> dict[int, list[float]]:
        with self.storage.lock:
            if name not in self.storage.checkpoints:
                raise ValueError(f"model {name!r} is not registered with this StrictBackend")
            return self.storage.checkpoints[name]

    # -- inference (called from the server thread) ----------------------------------------------------------

    def _served(self) -> list[str]:
        """Every name the endpoint answers: each model's latest, then one per kept step."""
        with self.storage.lock:
            kept = {name: sorted(self.storage.checkpoints.get(name, {})) for name in self._models}
        return [
            served for name, steps in kept.items() for served in [name, *(f"{name}@{step}" for step in steps)]
        ]

    def _sample(self, served_name: str, max_tokens: int, temperature: float, seed: int | None) -> _Completion:
        name, _, raw_step = served_name.partition("@")
        checkpoints = self._checkpoints(name)
        if raw_step and (not raw_step.isdigit() or int(raw_step) not in checkpoints):
            raise LookupError(f"model {served_name!r} has no such step; kept steps: {sorted(checkpoints)}")
        logits = checkpoints[int(raw_step) if raw_step else max(checkpoints)]
        probs = softmax(logits)
        tempered = softmax([value / max(temperature, 1e-6) for value in logits])
        rng = random.Random(seed)
        tokens: list[int] = []
        while len(tokens) < max_tokens:
            token = rng.choices(range(VOCAB_SIZE), weights=tempered)[0]
            tokens.append(token)
            if token == EOS_ID:
                break
        return _Completion(
            tokens, [math.log(probs[t]) for t in tokens], "stop" if tokens[-1] == EOS_ID else "length"
        )

    # -- training --------------------------------------------------------------------------------------------

    async def train(
        self,
        model: TrainableModel,
        trajectory_groups: Iterable[TrajectoryGroup],
        /,
        *,
        learning_rate: float = 5e-6,
        ppo: bool = False,
        epsilon: float | None = None,
        epsilon_high: float | None = None,
        advantage_balance: float = 0.0,
        scale_rewards: bool = True,
        importance_sampling_level: ImportanceSamplingLevel = "token",
    ) -> TrainResult:
        """One policy-gradient step of the letter policy (CISPO by default, PPO with ``ppo=True``)."""
        options = TrainOptions(
            learning_rate=learning_rate,
            ppo=ppo,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            advantage_balance=advantage_balance,
            scale_rewards=scale_rewards,
            importance_sampling_level=importance_sampling_level,
        )
        started = time.perf_counter()
        if self._models.get(model.name) is not model:
            raise ValueError(
                f"model {model.name!r} is not registered with this backend; await model.register(backend)"
            )
        groups = check_groups(trajectory_groups)
        samples = self._samples(groups, options.scale_rewards)
        checkpoints = self._checkpoints(model.name)
        step = max(checkpoints)
        logits = list(checkpoints[step])
        normalized = normalize_batch(
            [s.advantage for s in samples],
            [len(s.token_ids) for s in samples],
            advantage_balance=options.advantage_balance,
        )
        probs = softmax(logits)
        total_tokens = sum(len(s.token_ids) for s in samples)
        gradient, loss = _policy_gradient(
            samples, normalized.advantages, normalized.token_weights, probs, options
        )
        scale = 1.0 / (total_tokens + 1e-6)
        grad_norm = math.sqrt(math.fsum((g * scale) ** 2 for g in gradient))
        new_logits = [
            value + options.learning_rate * g * scale for value, g in zip(logits, gradient, strict=True)
        ]
        with self.storage.lock:
            checkpoints[step + 1] = new_logits
        entropy = -math.fsum(p * math.log(p) for p in probs if p > 0)
        metrics = {
            "loss/train": loss * scale,
            "loss/entropy": entropy,
            "loss/grad_norm": grad_norm,
            "loss/learning_rate": float(options.learning_rate),
            "data/step_num_groups_submitted": float(len(groups)),
            "data/step_num_groups_trainable": float(
                sum(is_trainable_group([t.reward for t in g.trajectories]) for g in groups)
            ),
            "data/step_num_trajectories": float(sum(len(g.trajectories) for g in groups)),
            "data/step_trainer_tokens": float(total_tokens),
            "data/step_num_gradient_steps": 1.0 if samples else 0.0,
            "time/step_trainer_s": time.perf_counter() - started,
        }
        return TrainResult(step=step + 1, metrics=metrics)

    def _samples(self, groups: list[TrajectoryGroup], scale_rewards: bool) -> list[_Sample]:
        samples: list[_Sample] = []
        for group_index, group in enumerate(groups):
            advantages = group_advantages([t.reward for t in group.trajectories], scale_rewards=scale_rewards)
            for trajectory_index, (trajectory, advantage) in enumerate(
                zip(group.trajectories, advantages, strict=True)
            ):
                where = f"group {group_index}, trajectory {trajectory_index}"
                choices = [item for item in trajectory.messages_and_choices if is_choice(item)]
                for history in trajectory.additional_histories:
                    choices += [item for item in history.messages_and_choices if is_choice(item)]
                if not choices:
                    raise ValueError(f"{where} has no Choice to train; append the completion's choices[0]")
                token_ids: list[int] = []
                old: list[float] = []
                for choice in choices:
                    content = choice.logprobs.content if choice.logprobs is not None else None
                    if not content:
                        raise ValueError(
                            f"{where}: a Choice has no logprobs; rollouts must request logprobs=True"
                        )
                    token_ids += [_parse_token_id(entry.token, where) for entry in content]
                    old += [entry.logprob for entry in content]
                if advantage != 0.0 and token_ids:
                    samples.append(_Sample(token_ids, old, advantage))
        return samples


def _policy_gradient(
    samples: Sequence[_Sample],
    advantages: Sequence[float],
    weights: Sequence[float],
    probs: Sequence[float],
    options: TrainOptions,
) -> tuple[list[float], float]:
    """The summed gradient of the clipped objective w.r.t. the logits, and the summed loss (unscaled)."""
    eps_low = options.epsilon if options.epsilon is not None else (0.2 if options.ppo else 1.0)
    eps_high = options.epsilon_high if options.epsilon_high is not None else (eps_low if options.ppo else 4.0)
    gradient = [0.0] * VOCAB_SIZE
    loss = 0.0
    for sample, advantage, weight in zip(samples, advantages, weights, strict=True):
        deltas = [
            math.log(probs[t]) - old for t, old in zip(sample.token_ids, sample.old_logprobs, strict=True)
        ]
        sequence_ratio = math.exp(math.fsum(deltas) / len(deltas))
        for token, delta in zip(sample.token_ids, deltas, strict=True):
            ratio = _importance_ratio(math.exp(delta), sequence_ratio, options.importance_sampling_level)
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            if options.ppo:
                active = ratio * advantage <= clipped * advantage  # the unclipped branch is the minimum
                coefficient = ratio * advantage if active else 0.0
                loss -= min(ratio * advantage, clipped * advantage) * weight
            else:
                coefficient = clipped * advantage
                loss -= clipped * advantage * math.log(probs[token]) * weight
            for index in range(VOCAB_SIZE):  # d log p(token) / d logit = onehot - p
                gradient[index] += coefficient * weight * ((index == token) - probs[index])
    return gradient, loss


def _importance_ratio(token_ratio: float, sequence_ratio: float, level: str) -> float:
    if level == "sequence":
        return sequence_ratio
    if level == "average":
        return (token_ratio + sequence_ratio) / 2
    if level == "geometric_average":
        return math.sqrt(token_ratio * sequence_ratio)
    return token_ratio


@dataclass(frozen=True)
class _Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(LETTERS[t] for t in self.token_ids if t != EOS_ID)

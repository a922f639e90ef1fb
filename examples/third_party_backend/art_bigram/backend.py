"""``BigramBackend``: a complete art backend in a few functions: register, serve, train, checkpoints."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import art_core as art
from art_core.plugin_api import (
    TrainOptions,
    check_groups,
    check_number,
    group_advantages,
    is_choice,
    is_trainable_group,
    normalize_batch,
)

from art_bigram import policy, storage
from art_bigram.server import InferenceServer, Sampled

BASE_MODEL = "bigram-letters"
Choices = list[tuple[list[int], list[float]]]  # (token ids, sampler logprobs) of each Choice of a trajectory


class BigramBackend:
    """Trains a bigram letter policy per model; checkpoints sit in the model's directory, so a new instance resumes."""

    def __init__(self, *, host: str = "127.0.0.1") -> None:
        self._host = host
        self._models: dict[str, art.TrainableModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._server: InferenceServer | None = None

    # -- what a Model needs from any backend (art_core.Backend) ---------------------------------------------

    async def register(self, model: art.Model) -> None:
        """Adopt a trainable model; its step-0 checkpoint is written the first time."""
        if not isinstance(model, art.TrainableModel):
            return  # a plain Model talks to its own endpoint
        if model.base_model != BASE_MODEL:
            raise ValueError(f"BigramBackend trains base_model={BASE_MODEL!r} only, not {model.base_model!r}")
        directory = checkpoint_dir(model)
        if not storage.saved_steps(directory):
            await asyncio.to_thread(storage.save, directory, 0, policy.initial_table())
        self._models[model.name] = model

    async def close(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
            self._server = None

    async def _get_step(self, model: art.TrainableModel) -> int:
        return max(storage.saved_steps(checkpoint_dir(model)), default=0)

    async def _delete_checkpoint_files(self, model: art.TrainableModel, steps_to_keep: list[int]) -> None:
        await asyncio.to_thread(storage.keep_only, checkpoint_dir(model), steps_to_keep)

    def _model_inference_name(self, model: art.Model, step: int | None = None) -> str:
        return model.name if step is None else f"{model.name}@{step}"

    async def _prepare_backend_for_training(self, model: art.TrainableModel) -> tuple[str, str]:
        if self._server is None:
            self._server = InferenceServer(self._sample, self._served, self._host)
        return self._server.base_url, self._server.api_key

    # -- inference (called on the server's threads) ---------------------------------------------------------

    def _sample(self, served_name: str, max_tokens: int, temperature: float, seed: int | None) -> Sampled:
        name, _, raw_step = served_name.partition("@")
        model = self._models.get(name)
        if model is None:
            raise LookupError(f"model {name!r} is not registered with this backend")
        directory = checkpoint_dir(model)
        if raw_step and not raw_step.isdigit():
            raise LookupError(f"{served_name!r}: the step after '@' must be a number")
        step = int(raw_step) if raw_step else max(storage.saved_steps(directory))
        table = storage.load(directory, step)
        ids, logprobs = policy.sample(table, max_tokens, temperature, random.Random(seed))
        finish = "stop" if ids[-1] == policy.EOS else "length"
        return Sampled(ids, logprobs, policy.text(ids), finish)

    def _served(self) -> list[str]:
        return [
            self._model_inference_name(model, step)
            for model in list(self._models.values())
            for step in storage.saved_steps(checkpoint_dir(model))
        ]

    # -- training ----------------------------------------------------------------------------------------------

    async def train(
        self,
        model: art.TrainableModel,
        trajectory_groups: Iterable[art.TrajectoryGroup],
        /,
        *,
        learning_rate: float = 5e-6,
        ppo: bool = False,
        epsilon: float | None = None,
        epsilon_high: float | None = None,
        advantage_balance: float = 0.0,
        scale_rewards: bool = True,
        importance_sampling_level: art.ImportanceSamplingLevel = "token",
        max_grad_norm: float | None = None,
        verbose: bool = False,
    ) -> art.TrainResult:
        """One policy-gradient step; returns the new step and its metrics (log them with ``model.log``)."""
        options = TrainOptions(  # art_core checks the common options, the same way for every backend
            learning_rate=learning_rate,
            ppo=ppo,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            advantage_balance=advantage_balance,
            scale_rewards=scale_rewards,
            importance_sampling_level=importance_sampling_level,
        )
        check_number("max_grad_norm", max_grad_norm, above=0.0, allow_none=True)  # and a backend's own ones
        started = time.monotonic()
        groups = check_groups(trajectory_groups)
        if self._models.get(model.name) is not model:
            raise ValueError(f"model {model.name!r} is not registered here; `await model.register(backend)`")
        completions = to_completions(
            groups, scale_rewards=options.scale_rewards, advantage_balance=options.advantage_balance
        )
        loss = policy.LossConfig(
            options.ppo, options.epsilon, options.epsilon_high, options.importance_sampling_level
        )
        lock = self._locks.setdefault(model.name, asyncio.Lock())
        async with lock:  # one step at a time per model: each reads step N and writes N + 1
            step, loss_value, grad_norm, tokens = await asyncio.to_thread(
                train_step, checkpoint_dir(model), completions, loss, options.learning_rate, max_grad_norm
            )
        metrics = {
            "loss/train": loss_value,
            "loss/grad_norm": grad_norm,
            "loss/learning_rate": float(options.learning_rate),
            "data/step_num_groups_submitted": float(len(groups)),
            "data/step_num_groups_trainable": float(
                sum(is_trainable_group([t.reward for t in group.trajectories]) for group in groups)
            ),
            "data/step_num_trajectories": float(sum(len(group.trajectories) for group in groups)),
            "data/step_trainer_tokens": float(tokens),
            "time/step_trainer_s": time.monotonic() - started,
        }
        if verbose:
            print(f"[art_bigram] {model.name} step {step}: loss={loss_value:.4g}", file=sys.stderr)
        return art.TrainResult(step=step, metrics=metrics)


def checkpoint_dir(model: art.Model) -> Path:
    """``{base_path}/{project}/models/{name}/checkpoints``, ART's layout."""
    return model.output_dir() / "checkpoints"


def train_step(
    directory: Path,
    completions: list[policy.Completion],
    loss: policy.LossConfig,
    learning_rate: float,
    max_grad_norm: float | None,
) -> tuple[int, float, float, int]:
    """Latest checkpoint → gradient → ascent → next checkpoint; returns (new step, loss, grad norm, tokens)."""
    step = max(storage.saved_steps(directory))
    table = storage.load(directory, step)
    gradient_CV, loss_value, tokens = policy.policy_gradient(table, completions, loss)
    updated, grad_norm = policy.ascend(table, gradient_CV, learning_rate, max_grad_norm)
    storage.save(directory, step + 1, updated)  # no signal still advances the step, with the same weights
    return step + 1, loss_value, grad_norm, tokens


def to_completions(
    groups: list[art.TrajectoryGroup], *, scale_rewards: bool, advantage_balance: float
) -> list[policy.Completion]:
    """Rewards → advantages (art_core) → one Completion per sampled Choice of each trajectory with signal."""
    trained: list[tuple[Choices, float]] = []
    for group_index, group in enumerate(groups):
        rewards = [trajectory.reward for trajectory in group.trajectories]
        advantages = group_advantages(rewards, scale_rewards=scale_rewards)
        for index, (trajectory, advantage) in enumerate(zip(group.trajectories, advantages, strict=True)):
            if advantage != 0.0:
                trained.append(
                    (sampled_choices(trajectory, f"trajectory {index} in group {group_index}"), advantage)
                )
    token_counts = [sum(len(ids) for ids, _ in choices) for choices, _ in trained]
    normalized = normalize_batch([a for _, a in trained], token_counts, advantage_balance=advantage_balance)
    return [
        policy.Completion(tuple(ids), tuple(logprobs), advantage, weight)
        for (choices, _), advantage, weight in zip(
            trained, normalized.advantages, normalized.token_weights, strict=True
        )
        for ids, logprobs in choices
    ]


def sampled_choices(trajectory: art.Trajectory, where: str) -> Choices:
    """The token ids and sampler logprobs of every Choice in the trajectory (main and additional histories)."""
    items = list(trajectory.messages_and_choices)
    for history in trajectory.additional_histories:
        items += history.messages_and_choices
    choices: Choices = []
    for choice in (item for item in items if is_choice(item)):
        content = choice.logprobs.content if choice.logprobs is not None else None
        if not content:
            raise ValueError(f"{where}: a Choice has no logprobs; request logprobs=True in the rollout")
        ids = [_token_id(entry.token, where) for entry in content]
        choices.append((ids, [entry.logprob for entry in content]))
    if not choices:
        raise ValueError(f"{where} has no Choice to train; append the completion's choices[0]")
    return choices


def _token_id(token: str, where: str) -> int:
    prefix, _, raw = token.partition(":")
    if prefix != "token_id" or not raw.isdigit() or int(raw) >= policy.VOCAB:
        raise ValueError(f"{where}: logprob token {token!r} is not one of this backend's 'token_id:<id>'")
    return int(raw)

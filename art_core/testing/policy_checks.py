"""The learning half of the contract, observed through the endpoint: training moves the served policy the way
the rewards say, reported logprobs are the model's, and every common option changes what training does.

Each check samples one short completion per request with a fixed seed, so a run repeats exactly on a
deterministic backend; the statistical bounds (``probes.FALSE_ALARM``) are there for those that are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import art_core as art
from art_core.testing.kit import Kit, violation
from art_core.testing.probes import (
    Sample,
    consistency_problems,
    first_token_logprobs,
    frequency_problems,
    median,
    most_common_first_token,
)
from art_core.testing.suite import PROMPTS, SuiteBase

SAMPLES = 16  # one-token completions per round
LOGPROB_TOLERANCE = 0.02  # batching may change the last float digits of a logprob, never more
DIRECTION_RULE = (
    "train() moves the served policy toward what the batch rewards and away from what it penalises"
)
LOGPROB_RULE = (
    "reported logprobs are the untempered model's log-probabilities of the sampled tokens, at any temperature "
    "(the trainer recomputes exactly that quantity)"
)
OPTION_RULE = "every common train() option changes what training does; an accepted option is never ignored"
# Off-policy data: old logprob = reported − δ, cycling per token, so ratios 1.65, 8.2 and 0.5 all occur.
OLD_LOGPROB_SHIFTS = (0.5, 2.1, -0.7)


def rewarding(
    samples: Sequence[Sample], token: str, *, reward_it: bool, size: int
) -> list[art.TrajectoryGroup]:
    """Groups of ``size`` that reward (or penalise) the samples beginning with ``token`` and nothing else."""
    trajectories = [s.trajectory(float((s.first == token) == reward_it)) for s in samples]
    return [art.TrajectoryGroup(trajectories[i : i + size]) for i in range(0, len(trajectories), size)]


def logprob_of(samples: Sequence[Sample], token: str) -> float | None:
    values = first_token_logprobs(samples).get(token)
    return None if values is None else median(values)


def jitter(*rounds: Sequence[Sample]) -> float:
    """The largest spread of one token's reported first logprob within a round (float noise of batching)."""
    spreads = [max(v) - min(v) for r in rounds for v in first_token_logprobs(r).values()]
    return max(spreads, default=0.0)


def off_policy(groups: list[art.TrajectoryGroup]) -> list[art.TrajectoryGroup]:
    """The same groups with each sampled logprob moved by ``OLD_LOGPROB_SHIFTS``, as a stale batch has them."""
    shifted = []
    for group in groups:
        trajectories = []
        for trajectory in group.trajectories:
            items: list[Any] = []
            for item in trajectory.messages_and_choices:
                if isinstance(item, dict) or item.logprobs is None or not item.logprobs.content:
                    items.append(item)
                    continue
                content = [
                    entry.model_copy(
                        update={"logprob": min(entry.logprob - OLD_LOGPROB_SHIFTS[i % 3], -1e-6)}
                    )
                    for i, entry in enumerate(item.logprobs.content)
                ]
                items.append(
                    item.model_copy(
                        update={"logprobs": item.logprobs.model_copy(update={"content": content})}
                    )
                )
            trajectories.append(trajectory.model_copy(update={"messages_and_choices": items}))
        shifted.append(art.TrajectoryGroup(trajectories))
    return shifted


class PolicyChecks(SuiteBase):
    def test_training_moves_the_policy_toward_the_rewards(self, kit: Kit) -> None:
        self.needs_inference()
        model = kit.registered_model()
        prompt = PROMPTS[0]
        at_0 = kit.sample(model, 0, SAMPLES, prompt=prompt, seed=1000)
        target = most_common_first_token(at_0)
        if len(first_token_logprobs(at_0)) < 2:
            violation(
                f"{SAMPLES} samples at temperature 1 all began with {target}",
                "sampling at temperature 1 draws from the model's distribution, not its most likely token",
            )
        step_1 = kit.train_step(model, rewarding(at_0, target, reward_it=True, size=8)).step
        at_1 = kit.sample(model, step_1, SAMPLES, prompt=prompt, seed=1000)  # same draws: the target recurs
        before, after = logprob_of(at_0, target), logprob_of(at_1, target)
        noise = max(1e-6, 2 * jitter(at_0, at_1))
        if before is None or after is None or after <= before + noise:
            violation(
                f"a batch rewarding the answers that begin with {target} took its logprob from {before} at "
                f"step 0 to {after} at step {step_1} ({'never sampled' if after is None else 'not higher'})",
                DIRECTION_RULE,
            )
        step_2 = kit.train_step(model, rewarding(at_1, target, reward_it=False, size=8)).step
        at_2 = kit.sample(model, step_2, SAMPLES, prompt=prompt, seed=1000)
        penalised = logprob_of(at_2, target)
        if penalised is not None and penalised >= after - noise:
            violation(
                f"a batch penalising the answers that begin with {target} took its logprob from {after:.5f} at "
                f"step {step_1} to {penalised:.5f} at step {step_2} (not lower): the reward's sign is ignored",
                DIRECTION_RULE,
            )

    def test_reported_logprobs_are_the_models(self, kit: Kit) -> None:
        self.needs_inference()
        model = kit.registered_model()
        prompt = PROMPTS[1]
        at_0 = kit.sample(model, 0, SAMPLES, prompt=prompt, seed=4000)
        step = kit.train_step(
            model, rewarding(at_0, most_common_first_token(at_0), reward_it=True, size=8)
        ).step
        warm = kit.sample(model, step, 2 * SAMPLES, prompt=prompt, seed=5000)
        cold = kit.sample(model, step, SAMPLES, prompt=prompt, seed=6000, temperature=0.5)
        problems = [
            *consistency_problems(warm, LOGPROB_TOLERANCE),
            *consistency_problems(cold, LOGPROB_TOLERANCE),
            *frequency_problems(warm),
        ]
        if problems:
            violation(f"at step {step}: " + "; ".join(problems), LOGPROB_RULE)
        at_1, at_half = first_token_logprobs(warm), first_token_logprobs(cold)
        shared = sorted(set(at_1) & set(at_half))
        if not shared:
            violation(
                f"no first token sampled at temperature 0.5 ({sorted(at_half)}) was sampled at temperature 1 "
                f"({sorted(at_1)}) in {len(warm)} tries",
                "temperature < 1 concentrates sampling on the tokens likely at temperature 1",
            )
        for token in shared:
            if abs(median(at_1[token]) - median(at_half[token])) > LOGPROB_TOLERANCE:
                violation(
                    f"{token} is reported with logprob {median(at_1[token]):.4f} at temperature 1 and "
                    f"{median(at_half[token]):.4f} at temperature 0.5: the logprobs follow the temperature",
                    LOGPROB_RULE,
                )

    def test_each_common_option_changes_the_trained_policy(self, kit: Kit) -> None:
        self.needs_inference()
        source = kit.registered_model()
        samples = [
            kit.sample(source, 0, self.group_size, prompt=p, seed=7000 + 100 * i, max_tokens=4)
            for i, p in enumerate(PROMPTS[:2])
        ]
        # Two groups whose reward spreads differ tenfold (for scale_rewards), off-policy (for the clipping options).
        groups = off_policy(
            [
                art.TrajectoryGroup(s.trajectory(float(i) * scale) for i, s in enumerate(group))
                for group, scale in zip(samples, (1.0, 0.1), strict=True)
            ]
        )
        variants: dict[str, dict[str, Any]] = {
            "ppo": {"ppo": True},
            "epsilon": {"epsilon": 0.3},
            "epsilon_high": {"epsilon_high": 0.2},
            "advantage_balance": {"advantage_balance": 0.5},
            "scale_rewards": {"scale_rewards": False},
            "importance_sampling_level": {"importance_sampling_level": "sequence"},
        }
        default = self._trained_probe(kit, groups, {})
        for option, value in variants.items():
            if self._trained_probe(kit, groups, value) == default:
                violation(
                    f"train(..., {option}={value[option]!r}) on an off-policy batch served exactly the policy "
                    f"train() with defaults did",
                    OPTION_RULE,
                )

    def _trained_probe(self, kit: Kit, groups: list[art.TrajectoryGroup], options: dict[str, Any]) -> Any:
        """A fresh model trained one step on ``groups`` with ``options``, seen through two seeded samples."""
        model = kit.registered_model()
        step = kit.train_step(model, groups, **options).step
        probe = kit.sample(model, step, 2, prompt=PROMPTS[2], seed=8000, max_tokens=4)
        return [(s.tokens, tuple(round(lp, 9) for lp in s.logprobs)) for s in probe]

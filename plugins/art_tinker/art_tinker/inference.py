"""``name`` / ``name@step`` served through art-local's OpenAI-compatible server, sampled by Tinker.

``TinkerSamplingEngine`` implements art-local's ``Engine`` protocol: the server renders the chat template into
prompt ids, the engine samples them with the step's tinker ``SamplingClient`` and returns the sampled ids with
their logprobs, which the server answers as ``"token_id:<id>"`` logprob tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from art_local.inference.engine import (
    Completion,
    SamplingParams,
    ServedModel,
    UnknownModelError,
    split_step_name,
)
from art_local.inference.protocol import RequestError

if TYPE_CHECKING:
    import tinker

SAMPLE_TIMEOUT_S = 600.0


@dataclass
class _ModelEntry:
    tokenizer: Any
    context_length: int
    latest: int = 0
    samplers: dict[int, tinker.SamplingClient] = field(default_factory=dict)
    created: dict[int, int] = field(default_factory=dict)


class TinkerSamplingEngine:
    """Serves each model's steps from Tinker sampling clients (one per step)."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelEntry] = {}

    def add_model(self, name: str, tokenizer: Any, context_length: int) -> None:
        """Start serving ``name`` (steps come with ``set_sampler``)."""
        self._models.setdefault(name, _ModelEntry(tokenizer, context_length))

    def set_sampler(self, name: str, step: int, client: tinker.SamplingClient) -> None:
        """``name@step`` answers with ``client``; ``name`` (latest) follows the newest step."""
        entry = self._models[name]
        entry.samplers[step] = client
        entry.created.setdefault(step, int(time.time()))
        entry.latest = max(entry.latest, step)

    def has_step(self, name: str, step: int) -> bool:
        entry = self._models.get(name)
        return entry is not None and step in entry.samplers

    def sampler(self, name: str, step: int) -> tinker.SamplingClient:
        return self._models[name].samplers[step]

    def forget_steps(self, name: str, keep: Sequence[int]) -> None:
        """Stop serving the steps of ``name`` not in ``keep`` (the latest is always kept)."""
        entry = self._models.get(name)
        if entry is None:
            return
        for step in [s for s in entry.samplers if s not in keep and s != entry.latest]:
            del entry.samplers[step]

    def served_models(self) -> list[ServedModel]:
        served = []
        for name, entry in self._models.items():
            if entry.latest in entry.samplers:
                served.append(
                    ServedModel(name, entry.tokenizer, entry.context_length, entry.created[entry.latest])
                )
            served += [
                ServedModel(f"{name}@{step}", entry.tokenizer, entry.context_length, entry.created[step])
                for step in sorted(entry.samplers)
            ]
        return served

    def _lookup(self, model: str) -> tuple[_ModelEntry, int]:
        name, step = split_step_name(model)
        entry = self._models.get(name)
        if entry is None or (step if step is not None else entry.latest) not in entry.samplers:
            raise UnknownModelError(model, [m.name for m in self.served_models()])
        return entry, entry.latest if step is None else step

    def resolve(self, model: str) -> ServedModel:
        entry, step = self._lookup(model)
        return ServedModel(model, entry.tokenizer, entry.context_length, entry.created[step])

    async def generate(
        self, model: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> list[Completion]:
        import tinker

        entry, step = self._lookup(model)
        if params.top_logprobs:
            raise RequestError(
                "top_logprobs is not supported by the Tinker backend; leave it unset", "top_logprobs"
            )
        if params.ignore_eos and params.stop:
            raise RequestError(
                "ignore_eos cannot be combined with stop strings on the Tinker backend", "stop"
            )
        stop: list[str] | None = [] if params.ignore_eos else (list(params.stop) or None)
        response = (
            await entry.samplers[step]
            .sample(
                tinker.ModelInput.from_ints(list(prompt_token_ids)),
                num_samples=params.n,
                sampling_params=tinker.SamplingParams(
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    seed=params.seed,
                    stop=stop,
                ),
            )
            .result_async(SAMPLE_TIMEOUT_S)
        )
        return [_completion(entry.tokenizer, seq, params.stop) for seq in response.sequences]


def _completion(tokenizer: Any, sequence: Any, stop: Sequence[str]) -> Completion:
    tokens = tuple(int(t) for t in sequence.tokens)
    logprobs = tuple(float(lp) for lp in (sequence.logprobs or []))
    if len(logprobs) != len(tokens):
        raise RuntimeError(f"Tinker returned {len(tokens)} tokens but {len(logprobs)} logprobs")
    body = tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_token_id else tokens
    text = tokenizer.decode(list(body), skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return Completion(
        token_ids=tokens,
        logprobs=logprobs,
        top_logprobs=(),
        text=text[: min(cuts)] if cuts else text,
        finish_reason="stop" if sequence.stop_reason == "stop" else "length",
    )

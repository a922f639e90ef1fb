"""The Engine protocol: what the OpenAI-compatible server needs from an inference engine.

Engines work on token ids. The server renders messages and tools with the model's chat template, asks the
engine for completions of those prompt ids, and turns the sampled ids, logprobs and text into an OpenAI
response. An engine serves names of the form ``{name}`` (the latest step) and ``{name}@{step}``.

Logprobs are always those of the *untempered* model distribution, ``log_softmax(logits)`` in fp32, whatever
temperature or top_p the sampler used. That is the quantity the trainer recomputes (docs/rl-math.md §3: ``old`` is the
sampler's logprob of the token under the policy π_θ), so a sampled ``Choice`` can be trained on as is; it also
matches vLLM's default ``logprobs_mode="raw_logprobs"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]

_STEP_NAME = re.compile(r"^(?P<name>.+)@(?P<step>\d+)$")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options (OpenAI semantics; ``n`` completions of one prompt)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens is {self.max_tokens}; it must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature is {self.temperature}; it must lie in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p is {self.top_p}; it must lie in (0, 1]")
        if self.n < 1:
            raise ValueError(f"n is {self.n}; it must be at least 1")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs is {self.top_logprobs}; it must lie in [0, 20]")
        if any(not s for s in self.stop):
            raise ValueError(f"stop {self.stop!r} holds an empty string; stop strings must be non-empty")


@dataclass(frozen=True)
class Completion:
    """One sampled completion: the exact token ids, their logprobs and the decoded text."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # log π(token_t | prefix) at temperature 1, fp32
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]  # per token, the k most likely (id, logprob)
    text: str  # decoded without the terminating eos token and cut before a matched stop string
    finish_reason: FinishReason  # "stop": eos or a stop string; "length": max_tokens or the context end

    def __post_init__(self) -> None:
        assert len(self.token_ids) == len(self.logprobs), "one logprob per sampled token"
        assert not self.top_logprobs or len(self.top_logprobs) == len(self.token_ids)


@dataclass(frozen=True)
class ServedModel:
    """What the server needs to render prompts for a served name."""

    name: str  # the name as requested ("agent" or "agent@3")
    tokenizer: PreTrainedTokenizerBase
    context_length: int  # prompt + completion tokens the model accepts
    created: int  # unix time the name was first served (for /v1/models)


class UnknownModelError(LookupError):
    """A request named a model (or step) the engine does not serve; the server answers 404."""

    def __init__(self, model: str, served: Sequence[str]) -> None:
        self.model = model
        shown = ", ".join(sorted(served)[:20]) or "none"
        super().__init__(f"model {model!r} is not served here; served models: {shown}")


@runtime_checkable
class Engine(Protocol):
    """Generates completions from prompt token ids for the models it serves."""

    def served_models(self) -> list[ServedModel]:
        """Every name a request may use right now (for ``GET /v1/models``)."""
        ...

    def resolve(self, model: str) -> ServedModel:
        """The tokenizer and limits for ``model``; raises ``UnknownModelError`` when it is not served."""
        ...

    async def generate(
        self, model: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> list[Completion]:
        """``params.n`` completions of the prompt, in order.

        Raises ``UnknownModelError`` (→ 404) when ``model`` is not served, and
        ``art_local.inference.protocol.RequestError`` (→ 400) for an option the engine cannot honour; any
        other exception answers 500 with its text, and the server keeps serving.
        """
        ...


def split_step_name(model: str) -> tuple[str, int | None]:
    """``"agent@3"`` → ``("agent", 3)``; ``"agent"`` → ``("agent", None)``."""
    match = _STEP_NAME.match(model)
    if match is None:
        return model, None
    return match.group("name"), int(match.group("step"))

"""Fixtures for art-local tests: the tiny model (built once, offline) and makers of sampled ``Choice`` objects."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The seed-0 ``tiny`` model (cached under $ART_CACHE_DIR or ~/.cache/art)."""
    from art_local.tiny import build_tiny_model

    return build_tiny_model("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


ChoiceMaker = Callable[..., Any]


@pytest.fixture(scope="session")
def make_choice(tiny_tokenizer: Any) -> ChoiceMaker:
    """``make_choice(text_or_ids, logprobs=-1.0, *, eos=True, tool_calls=None, with_logprobs=True)`` → Choice."""
    from openai.types.chat import ChatCompletionMessage, ChatCompletionTokenLogprob
    from openai.types.chat.chat_completion import Choice, ChoiceLogprobs

    def make(
        content: str | Sequence[int],
        logprobs: float | Sequence[float] = -1.0,
        *,
        eos: bool = True,
        tool_calls: list[dict[str, Any]] | None = None,
        with_logprobs: bool = True,
        token_format: Callable[[int], str] = lambda token_id: f"token_id:{token_id}",
    ) -> Choice:
        if isinstance(content, str):
            ids = list(tiny_tokenizer.encode(content, add_special_tokens=False))
            text = content
        else:
            ids, text = list(content), tiny_tokenizer.decode(list(content))
        if eos:
            ids.append(tiny_tokenizer.eos_token_id)
        values = [float(logprobs)] * len(ids) if isinstance(logprobs, (int, float)) else list(logprobs)
        assert len(values) == len(ids), f"{len(values)} logprobs for {len(ids)} tokens"
        entries = [
            ChatCompletionTokenLogprob(token=token_format(i), logprob=v, bytes=None, top_logprobs=[])
            for i, v in zip(ids, values, strict=True)
        ]
        message = ChatCompletionMessage.model_validate(
            {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls else {})}
        )
        return Choice(
            finish_reason="tool_calls" if tool_calls else ("stop" if eos else "length"),
            index=0,
            message=message,
            logprobs=ChoiceLogprobs(content=entries) if with_logprobs else None,
        )

    return make


@pytest.fixture(scope="session")
def sort_groups(make_choice: ChoiceMaker) -> Callable[..., list[Any]]:
    """``sort_groups(n_groups=2, logprob=-1.0)``: groups of 4 answers to "Sort these letters", one correct each."""
    import art_core as art

    prompts = ["d a c", "b e f", "j h g", "c b a"]

    def make(
        n_groups: int = 2, logprob: float = -1.0, rewards: Sequence[float] = (1.0, 0.0, 0.0, 0.0)
    ) -> list[Any]:
        groups = []
        for letters in prompts[:n_groups]:
            answers = ["".join(sorted(letters.split())), letters.replace(" ", ""), "xyz", "a"]
            trajectories = [
                art.Trajectory(
                    messages_and_choices=[
                        {"role": "user", "content": f"Sort these letters: {letters}"},
                        make_choice(answer, logprob),
                    ],
                    reward=reward,
                )
                for answer, reward in zip(answers, rewards, strict=True)
            ]
            groups.append(art.TrajectoryGroup(trajectories))
        return groups

    return make


ClaimWrittenWith = Callable[[Any, Path, Path], Path]


@pytest.fixture(scope="session")
def claim_written_with() -> ClaimWrittenWith:
    """``claim(config, checkpoint_dir, copy)``: a copy of a checkpoint whose metadata says ``config`` wrote it."""
    import json
    import shutil

    from art_local.training.state import FINGERPRINT_VERSION

    def claim(config: Any, directory: Path, copy: Path) -> Path:
        shutil.copytree(directory, copy)
        metadata = json.loads((copy / "metadata.json").read_text())
        metadata.update(
            fingerprint=config.fingerprint(),
            fingerprint_version=FINGERPRINT_VERSION,
            fingerprint_fields=config.fingerprint_fields(),
            config=config.to_json(),
        )
        (copy / "metadata.json").write_text(json.dumps(metadata))
        return copy

    return claim

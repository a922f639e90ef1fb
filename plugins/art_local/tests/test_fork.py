"""fork_checkpoint on LocalBackend: a real trained step is copied atomically, the fork resumes from it,
``name@step`` serves the same weights, and the source is left alone."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import art_core as art
from art_local.backend import LocalBackend
from art_local.training import get_weights

Groups = Callable[..., list[Any]]
MESSAGES = [{"role": "user", "content": "Sort these letters: d a c"}]


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    local = LocalBackend(str(tmp_path / "art"), device="cpu")
    yield local
    await local.close()


def trainable(name: str, tiny_model_dir: Path) -> art.TrainableModel:
    return art.TrainableModel(name=name, project="p", base_model=str(tiny_model_dir))


async def sample(model: art.TrainableModel, step: int) -> list[tuple[str, float]]:
    completion = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(step),
        messages=MESSAGES,
        logprobs=True,
        max_tokens=6,
        seed=5,  # type: ignore[arg-type]
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content
    return [(entry.token, entry.logprob) for entry in content]


async def test_a_fork_resumes_from_the_chosen_step_and_serves_it(
    backend: LocalBackend, tiny_model_dir: Path, sort_groups: Groups
) -> None:
    source = trainable("run-a", tiny_model_dir)
    await source.register(backend)
    for _ in range(3):
        await backend.train(source, sort_groups(2), learning_rate=5e-2)
    source_dir = source.output_dir() / "checkpoints"
    step_2 = load_file(str(source_dir / "0002" / "adapter_model.safetensors"))
    before = {p.name: p.read_bytes() for p in (source_dir / "0003").iterdir()}

    forked = trainable("run-b", tiny_model_dir)
    assert await backend.fork_checkpoint(forked, from_model="run-a", not_after_step=2) == 2
    forked_dir = Path(backend._path) / "p" / "models" / "run-b" / "checkpoints"
    assert sorted(p.name for p in forked_dir.iterdir()) == ["0002"]  # the step itself, no temporaries left
    await forked.register(backend)
    assert await forked.get_step() == 2
    weights = get_weights(backend._slots["run-b"].components)
    assert all(torch.equal(weights[key], value) for key, value in step_2.items())

    assert forked.get_inference_name(2) == "run-b@2"
    # the same weights serve under both names: the same tokens; logprobs equal up to float summation order
    # (they differed by 5e-7 on a 2-vCPU AMD EPYC, in one full-suite run)
    served, original = await sample(forked, 2), await sample(source, 2)
    assert [token for token, _ in served] == [token for token, _ in original]
    assert [lp for _, lp in served] == pytest.approx([lp for _, lp in original], abs=1e-5)
    result = await backend.train(forked, sort_groups(2), learning_rate=5e-2)
    assert result.step == 3 and (forked_dir / "0003" / "metadata.json").is_file()
    assert {p.name: p.read_bytes() for p in (source_dir / "0003").iterdir()} == before  # source untouched

    latest = trainable("run-c", tiny_model_dir)  # ART's name; no not_after_step: the latest step
    assert await backend._experimental_fork_checkpoint(latest, from_model="run-a", from_project="p") == 3


async def test_fork_refuses_what_would_not_resume_from_the_fork(
    backend: LocalBackend, tiny_model_dir: Path, sort_groups: Groups, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = trainable("src", tiny_model_dir)
    await source.register(backend)
    await backend.train(source, sort_groups(1), learning_rate=5e-2)
    with pytest.raises(ValueError, match=r"src.*already registered.*before `await model.register"):
        await backend.fork_checkpoint(source, from_model="src")
    with pytest.raises(ValueError, match=r"at or before step 0; its steps are \[1\]"):
        await backend.fork_checkpoint(trainable("new", tiny_model_dir), from_model="src", not_after_step=0)
    with pytest.raises(FileNotFoundError, match=r"nope.*no complete checkpoint"):
        await backend.fork_checkpoint(trainable("new", tiny_model_dir), from_model="nope")
    with pytest.raises(ValueError, match=r"from_model='\.\./src' is not a model or project name"):
        await backend.fork_checkpoint(trainable("new", tiny_model_dir), from_model="../src")
    with pytest.raises(NotImplementedError, match="download the checkpoint"):
        await backend.fork_checkpoint(trainable("new", tiny_model_dir), from_model="src", from_s3_bucket="b")

    copied = 0
    real_copy = shutil.copy2

    def failing_copy(source_path: Any, target: Any) -> Any:
        nonlocal copied
        copied += 1
        if copied == 2:
            raise OSError("disk full")
        return real_copy(source_path, target)

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        await backend.fork_checkpoint(trainable("half", tiny_model_dir), from_model="src")
    half = Path(backend._path) / "p" / "models" / "half" / "checkpoints"
    assert list(half.iterdir()) == []  # a failed copy leaves neither a step nor a temporary
    monkeypatch.undo()

    assert await backend.fork_checkpoint(trainable("half", tiny_model_dir), from_model="src") == 1
    with pytest.raises(ValueError, match=r"already has checkpoints at steps \[1\]"):
        await backend.fork_checkpoint(trainable("half", tiny_model_dir), from_model="src")

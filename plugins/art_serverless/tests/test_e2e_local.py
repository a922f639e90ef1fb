"""End to end on loopback: ``art serverless serve --backend local`` as a subprocess, the tiny model, three RL
steps through ServerlessBackend with rollouts through the server's own chat endpoint, logging, checkpoint
listing and deletion, then a restart that resumes where training stopped."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import openai
import pytest
from serverless_harness import ProcessServer

import art_core as art
from art_serverless import ServerlessBackend

pytest.importorskip("art_local.backend")
pytestmark = pytest.mark.slow

KEY = "e2e-test-key-0123456789"
PROMPTS = ["count to three", "name a colour"]


def art_serve(data_dir: Path, key_file: Path) -> ProcessServer:
    """The real CLI: the ``art`` launcher with the sub-command this plugin contributes."""
    launcher = Path(sys.executable).with_name("art")
    argv = [
        str(launcher),
        "serverless",
        "serve",
        "--backend",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--api-key-file",
        str(key_file),
        "--data-dir",
        str(data_dir),
    ]
    return ProcessServer(argv, env={"ART_LOAD_PLUGINS": "local,serverless"}, ready_timeout=180)


async def rollout(model: art.TrainableModel, prompt: str) -> art.Trajectory:
    """One sampled answer through the server's /v1/chat/completions, rewarded by its length."""
    messages = [{"role": "user", "content": prompt}]
    response = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(),
        messages=messages,
        logprobs=True,
        max_tokens=8,
        temperature=1.0,  # type: ignore[arg-type]
    )
    assert response.model == model.get_inference_name()
    choice = response.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    assert all(entry.token.startswith("token_id:") for entry in choice.logprobs.content)
    return art.Trajectory(
        messages_and_choices=[*messages, choice], reward=float(len(choice.message.content or ""))
    )


async def test_three_rl_steps_through_a_self_hosted_server(tmp_path: Path) -> None:
    from art_local.tiny import build_tiny_model

    tiny = build_tiny_model("tiny")
    data_dir, key_file = tmp_path / "server", tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    server = art_serve(data_dir, key_file).start()
    try:
        backend = ServerlessBackend(KEY, server.url, poll_interval=0.2, no_progress_timeout=300)
        model = art.TrainableModel(
            name="e2e",
            project="serverless",
            base_model=str(tiny),
            base_path=str(tmp_path / "client"),
            report_metrics=[],
        )
        await model.register(backend)
        assert model.entity == "local" and model.id is not None
        results = []
        for _ in range(3):
            groups = await art.gather_trajectory_groups(
                art.TrajectoryGroup(rollout(model, prompt) for _ in range(4)) for prompt in PROMPTS
            )
            result = await backend.train(model, groups, learning_rate=1e-3)
            await model.log(groups, metrics=result.metrics, step=result.step)
            results.append(result)
        assert [r.step for r in results] == [1, 2, 3]
        assert results[-1].artifact_name == "local/serverless/e2e:step3"
        assert all(
            "loss/grad_norm" in r.metrics and r.metrics["data/step_num_groups_submitted"] == 2
            for r in results
        )
        assert [record["step"] for record in model.read_history()] == [1, 2, 3]
        assert (model.output_dir() / "trajectories" / "train" / "0003.parquet").exists()

        checkpoints_dir = data_dir / "backend" / "serverless" / "models" / model.id / "checkpoints"
        assert [c.step for c in await backend.list_checkpoints(model)] == [1, 2, 3]
        assert sorted(p.name for p in checkpoints_dir.iterdir() if p.name.isdigit()) == [
            "0001",
            "0002",
            "0003",
        ]
        kept = await model.delete_checkpoints("train/reward")
        assert 3 in kept and [c.step for c in await backend.list_checkpoints(model)] == kept
        assert sorted(int(p.name) for p in checkpoints_dir.iterdir() if p.name.isdigit()) == kept
        client = model.openai_client()
        gone = next(step for step in (1, 2) if step not in kept)
        with pytest.raises(openai.NotFoundError, match=f"e2e:step{gone}"):
            await client.chat.completions.create(
                model=model.get_inference_name(gone),
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
            )
        answer = await client.chat.completions.create(
            model=model.get_inference_name(3), messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert answer.model == "wandb-artifact:///local/serverless/e2e:step3"
        await backend.close()
    finally:
        server.stop()
        server.kill()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is a clean exit here
    assert server.process is not None and server.process.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in "".join(server.output), "".join(server.output)[-3000:]

    restarted = art_serve(data_dir, key_file).start()
    try:
        backend = ServerlessBackend(KEY, restarted.url, poll_interval=0.2, progress=False)
        again = art.TrainableModel(
            name="e2e",
            project="serverless",
            base_model=str(tiny),
            base_path=str(tmp_path / "client"),
            report_metrics=[],
        )
        await again.register(backend)
        assert again.id == model.id and await again.get_step() == 3
        groups = await art.gather_trajectory_groups(
            [art.TrajectoryGroup(rollout(again, prompt) for _ in range(4)) for prompt in PROMPTS]
        )
        assert (await backend.train(again, groups, learning_rate=1e-3)).step == 4
        await backend.close()
    finally:
        restarted.stop()
        restarted.kill()

"""ServerlessBackend.train_sft() against ``art serverless serve --backend local`` (a real subprocess on loopback):
the server's SFT endpoint trains its LocalBackend, the step is served, RL continues from it; bad bodies are 422s."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from test_e2e_local import KEY, art_serve, rollout

import art_core as art
from art_serverless import ServerlessBackend

pytest.importorskip("art_local.backend")
pytestmark = pytest.mark.slow


def _sort_data(count: int) -> list[art.Trajectory]:
    from art_local.demo.task import answer, messages, split_triples

    return [
        art.Trajectory(messages_and_choices=[*messages(t), {"role": "assistant", "content": answer(t)}])
        for t in split_triples()[0][:count]
    ]


async def test_sft_through_the_server_then_rl_from_its_step(tmp_path: Path) -> None:
    from art_local.tiny import build_tiny_model

    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    server = art_serve(tmp_path / "server", key_file).start()
    try:
        backend = ServerlessBackend(
            KEY, server.url, poll_interval=0.2, no_progress_timeout=300, progress=False
        )
        model = art.TrainableModel(
            name="sft",
            project="serverless",
            base_model=str(build_tiny_model("tiny")),
            base_path=str(tmp_path / "client"),
            report_metrics=[],
        )
        await model.register(backend)
        result = await backend.train_sft(model, _sort_data(32), learning_rate=3e-3, batch_size=8, epochs=2)
        assert isinstance(result, art.ServerlessTrainResult) and result.step == 1 == await model.get_step()
        assert result.artifact_name == "local/serverless/sft:step1"
        metrics = result.metrics
        assert metrics["data/sft_examples"] == 32 and metrics["data/step_num_gradient_steps"] == 8
        assert metrics["loss/sft_last_batch"] < metrics["loss/sft_first_batch"]
        answer = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(1), messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert answer.model == "wandb-artifact:///local/serverless/sft:step1"
        groups = await art.gather_trajectory_groups(
            [art.TrajectoryGroup(rollout(model, "hi") for _ in range(4))]
        )
        assert (await backend.train(model, groups, learning_rate=1e-3)).step == 2

        with pytest.raises(ValueError, match="trajectory 0 has no assistant turn"):
            await backend.train_sft(
                model, [art.Trajectory(messages_and_choices=[{"role": "user", "content": "x"}])]
            )
        url = f"{server.url}/preview/sft-training-jobs"
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient() as client:
            bad = [
                (
                    {"model_id": model.id, "trajectories": [{"messages_and_choices": [{"content": "x"}]}]},
                    "trajectories[0]",
                ),
                (
                    {
                        "model_id": model.id,
                        "trajectories": [{"messages_and_choices": [{"role": "user", "content": "x"}]}],
                    },
                    "no assistant turn",
                ),
                ({"model_id": model.id, "trajectories": [{}], "config": {"epochs": 0}}, "epochs=0"),
            ]
            for body, text in bad:
                response = await client.post(url, json=body, headers=headers)
                assert response.status_code == 422 and text in response.text, response.text
        assert await model.get_step() == 2
        await backend.close()
    finally:
        server.stop()
        server.kill()
    assert "Traceback" not in "".join(server.output), "".join(server.output)[-3000:]

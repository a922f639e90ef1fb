"""``POST /v1/preview/sft-training-jobs``: queue a ``train_sft()`` of the server's backend on the model's worker."""

from __future__ import annotations

from typing import Any

import pydantic
from fastapi import APIRouter, Request

from art_core.sft import sft_conversations
from art_core.trajectories import Trajectory
from art_serverless.server.state import ApiError, run_db, state_of
from art_serverless.sft import SFT_JOBS_PATH, CreateSFTJobBody

sft_router = APIRouter(prefix="/v1")


def parse_trajectories(raw: list[dict[str, Any]], assistant_turns: Any) -> list[Trajectory]:
    """The body's trajectories, each with an assistant turn to train on; a 422 names the first bad one."""
    trajectories = []
    for index, item in enumerate(raw):
        try:
            trajectories.append(Trajectory.model_validate(item))
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ApiError(422, f"trajectories[{index}].{where}: {first['msg']}") from None
    try:
        sft_conversations(trajectories, assistant_turns)
    except ValueError as error:
        raise ApiError(422, str(error)) from None
    return trajectories


@sft_router.post(SFT_JOBS_PATH)
async def create_sft_job(body: CreateSFTJobBody, request: Request) -> dict[str, Any]:
    """Validate and queue an SFT job; answers its id at once (events as for a training job)."""
    state = state_of(request)
    row = await run_db(state.store.get_model, body.model_id)
    if not callable(getattr(state.host.backend, "train_sft", None)):
        raise ApiError(
            422,
            f"the server's {state.config.backend!r} backend has no train_sft(); serve with --backend local",
        )
    trajectories = parse_trajectories(body.trajectories, body.config.assistant_turns)
    stored = {
        "kind": "sft",
        "trajectories": [trajectory.model_dump(mode="json") for trajectory in trajectories],
        "options": body.config.model_dump(),
    }
    job = await run_db(state.store.create_job, row.id, stored)
    state.runner.submit(job)
    return {"id": job.id}

"""The routes of the serverless-RL API (docs/protocols.md §1) under ``/v1``, plus the OpenAI inference routes."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import httpx
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from art_core.plugin_api import validate_model_name, validate_name
from art_serverless import wire
from art_serverless.server.checks import parse_groups
from art_serverless.server.host import train_options
from art_serverless.server.proxy import ModelNames, forward_chat, models_list
from art_serverless.server.state import ApiError, run_db, state_of

router = APIRouter(prefix="/v1")
# Longest base_model accepted: a hub id or a server-side path (PATH_MAX on Linux).
MAX_BASE_MODEL_LENGTH = 4096
# Event ids are SQLite integers; a longer ``after`` cannot be one of ours.
MAX_EVENT_ID_DIGITS = 18


@router.post("/preview/models")
async def create_model(body: wire.CreateModelBody, request: Request) -> dict[str, Any]:
    """Create a model, or return the existing one when ``return_existing`` (idempotent registration)."""
    state = state_of(request)
    try:
        entity = validate_name(body.entity or state.config.default_entity, "entity")
        project = validate_name(body.project, "project name")
        name = validate_model_name(body.name)
    except ValueError as error:
        raise ApiError(422, str(error)) from None
    if not body.base_model.strip():
        raise ApiError(
            422, "base_model is empty; name the model to start from (a hub id or a server-side path)"
        )
    if len(body.base_model) > MAX_BASE_MODEL_LENGTH or not body.base_model.isprintable():
        raise ApiError(
            422,
            f"base_model {body.base_model[:80]!r}... is not a hub id or a path: it has {len(body.base_model)} "
            f"characters (at most {MAX_BASE_MODEL_LENGTH}) or control characters",
        )
    row, _ = await run_db(
        state.store.create_model,
        entity,
        project,
        name,
        body.base_model,
        return_existing=body.return_existing,
    )
    return row.public()


@router.delete("/preview/models/{model_id}")
async def delete_model(model_id: str, request: Request) -> None:
    """Forget a model and its records (409 while it has unfinished jobs)."""
    state = state_of(request)
    async with state.runner.model_lock(model_id):
        await run_db(state.store.delete_model, model_id)
    state.host.forget(model_id)


@router.get("/preview/models/{model_id}/checkpoints")
async def list_checkpoints(
    model_id: str,
    request: Request,
    after: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    order: Literal["asc", "desc"] = "asc",
) -> dict[str, Any]:
    """A page of the model's kept checkpoints, by step."""
    store = state_of(request).store
    rows, has_more = await run_db(store.list_checkpoints, model_id, after=after, limit=limit, order=order)
    return {"data": [row.public() for row in rows], "has_more": has_more}


@router.delete("/preview/models/{model_id}/checkpoints")
async def delete_checkpoints(
    model_id: str, body: wire.DeleteCheckpointsBody, request: Request
) -> dict[str, Any]:
    """Delete checkpoints by step, through the backend's ``_delete_checkpoint_files``; never the latest."""
    state = state_of(request)
    row = await run_db(state.store.get_model, model_id)
    async with state.runner.model_lock(model_id):
        kept = await run_db(state.store.checkpoint_steps, model_id)
        wanted = sorted(set(body.steps))
        found = [step for step in wanted if step in kept]
        if kept and kept[-1] in found:
            raise ApiError(
                400,
                f"step {kept[-1]} is the latest checkpoint of model {model_id}; training continues from it, so it "
                "cannot be deleted (delete the model instead)",
            )
        if found:
            await state.host.delete_checkpoints(row, [step for step in kept if step not in found])
            await run_db(state.store.delete_checkpoint_records, model_id, found)
    return {"deleted_count": len(found), "not_found_steps": [step for step in wanted if step not in kept]}


@router.post("/preview/training-jobs")
async def create_training_job(body: wire.CreateTrainingJobBody, request: Request) -> dict[str, Any]:
    """Validate and queue a training job; answers its id at once (the job runs on the model's worker)."""
    state = state_of(request)
    row = await run_db(state.store.get_model, body.model_id)
    groups = parse_groups(body.trajectory_groups)
    try:
        options = train_options(body.experimental_config, state.host.accepted_options, state.config.backend)
    except ValueError as error:
        raise ApiError(422, str(error)) from None
    stored = {
        "trajectory_groups": [group.model_dump(mode="json") for group in groups],
        "options": options,
    }
    job = await run_db(state.store.create_job, row.id, stored)
    state.runner.submit(job)
    return {"id": job.id}


@router.get("/preview/training-jobs/{job_id}")
async def get_training_job(job_id: str, request: Request) -> dict[str, Any]:
    """A job's status (an extension of the protocol, for operators)."""
    job = await run_db(state_of(request).store.get_job, job_id)
    return {"id": job.id, "model_id": job.model_id, "status": job.status}


@router.get("/preview/training-jobs/{job_id}/events")
async def list_events(
    job_id: str, request: Request, after: str | None = None, limit: int = Query(100, ge=1, le=1000)
) -> dict[str, Any]:
    """A page of a job's events after ``after``, ascending."""
    if after is not None and not (after.isascii() and after.isdigit() and len(after) <= MAX_EVENT_ID_DIGITS):
        raise ApiError(
            422,
            f"after={after[:40]!r} is not an event id from this server; pass the id of the last event seen",
        )
    store = state_of(request).store
    events, has_more = await run_db(store.list_events, job_id, None if after is None else int(after), limit)
    return {"data": [event.public() for event in events], "has_more": has_more}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """OpenAI ``/v1/models``: every model's latest name and one per kept step."""
    models = await run_db(state_of(request).store.models_with_steps)
    return models_list([(row.entity, row.project, row.name, steps) for row, steps in models])


async def _client_left(request: Request) -> None:
    """Return once the client has disconnected (its body was read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/chat/completions")
async def chat_completions(body: dict[str, Any], request: Request) -> Response:
    """OpenAI ``/v1/chat/completions``, relayed to the backend's endpoint with the model name mapped."""
    state = state_of(request)
    public = body.get("model")
    if not isinstance(public, str):
        got = "missing" if public is None else f"a {type(public).__name__}, not a string"
        raise ApiError(422, f"'model' is {got}; pass model.get_inference_name() as the model")
    try:
        entity, project, name, step = wire.parse_artifact_name(public)
    except ValueError as error:
        raise ApiError(404, str(error), "not_found_error") from None
    row = await run_db(state.store.find_model, entity, project, name)
    steps = await run_db(state.store.checkpoint_steps, row.id)
    base_url, api_key, names = await state.host.inference_target(row, step, steps)
    names = ModelNames(names.upstream, public, {**names.aliases, names.upstream: public})
    relay = asyncio.ensure_future(
        forward_chat(state.proxy, base_url=base_url, api_key=api_key, body=body, names=names)
    )
    gone = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not relay.done():  # the client left: closing the upstream request cancels the backend's work
            relay.cancel()
    if not relay.done() or relay.cancelled():
        raise ApiError(499, "the client closed the connection", "invalid_request_error")
    try:
        return relay.result()
    except httpx.TransportError as error:
        raise ApiError(
            502,
            f"the {state.config.backend!r} backend's inference endpoint failed: {error!r}",
            "server_error",
        ) from None

"""Inference through the server: ``/v1/chat/completions`` relayed to the backend's own OpenAI endpoint.

Clients name models ``wandb-artifact:///entity/project/name[:stepN]``; the backend knows them by the name its
``_model_inference_name`` gives (``{server id}[@N]`` for the local backend). Names are rewritten both ways.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from art_serverless.wire import artifact_name


@dataclass(frozen=True)
class ModelNames:
    """The name sent to the backend, the name the client used, and every backend name → public name of the
    model (its latest and each kept step), to translate the backend's answers and error messages."""

    upstream: str
    public: str
    aliases: Mapping[str, str]

    def translate(self, text: str) -> str:
        """Every backend name in ``text`` replaced by its public name (longest first, in one pass)."""
        names = sorted(self.aliases, key=len, reverse=True)
        if not names:
            return text
        pattern = re.compile("|".join(re.escape(name) for name in names))
        return pattern.sub(lambda match: self.aliases[match.group(0)], text)


def rename(payload: Any, names: ModelNames) -> Any:
    """Replace backend model names by public ones in a response body or error message."""
    if not isinstance(payload, dict):
        return payload
    renamed = dict(payload)
    if renamed.get("model") in names.aliases:
        renamed["model"] = names.aliases[renamed["model"]]
    error = renamed.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        renamed["error"] = {**error, "message": names.translate(error["message"])}
    return renamed


def _rename_sse_line(line: str, names: ModelNames) -> str:
    if not line.startswith("data:"):
        return line
    data = line[len("data:") :].strip()
    if not data or data == "[DONE]":
        return line
    try:
        parsed = json.loads(data)
    except ValueError:
        return line
    return "data: " + json.dumps(rename(parsed, names), separators=(",", ":"))


async def _relay_sse(response: httpx.Response, names: ModelNames) -> AsyncIterator[bytes]:
    async for line in response.aiter_lines():
        yield (_rename_sse_line(line, names) + "\n").encode()


async def forward_chat(
    client: httpx.AsyncClient,
    *,
    base_url: str,
    api_key: str,
    body: dict[str, Any],
    names: ModelNames,
) -> Response:
    """POST ``body`` (with the backend's model name) to the backend and relay its answer, streamed or not."""
    request = client.build_request(
        "POST",
        f"{base_url}/chat/completions",
        json={**body, "model": names.upstream},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    response = await client.send(request, stream=True)
    media_type = response.headers.get("content-type", "application/json")
    if response.is_success and media_type.startswith("text/event-stream"):
        return StreamingResponse(
            _relay_sse(response, names),
            status_code=response.status_code,
            media_type="text/event-stream",
            background=BackgroundTask(response.aclose),
        )
    try:
        content = await response.aread()
    finally:
        await response.aclose()
    try:
        payload = json.loads(content)
    except ValueError:
        return Response(content, status_code=response.status_code, media_type=media_type)
    return Response(
        json.dumps(rename(payload, names)),
        status_code=response.status_code,
        media_type="application/json",
    )


def models_list(models: list[tuple[str, str, str, list[int]]]) -> dict[str, Any]:
    """The OpenAI ``/v1/models`` body: each model's latest name and one name per kept step."""
    data = []
    for entity, project, name, steps in models:
        for step in [None, *steps]:
            data.append(
                {
                    "id": artifact_name(entity, project, name, step),
                    "object": "model",
                    "created": 0,
                    "owned_by": entity,
                }
            )
    return {"object": "list", "data": data}

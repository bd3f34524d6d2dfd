"""The gateway's OpenAI routes on the platform's API: authenticate the tenant, find the
requested model's deployment, pick an instance under its policy, forward.

The request body is forwarded as received; the gateway reads only what routing needs
(``model``, the prompt or messages, ``max_tokens``, ``n``, ``stream``). Everything else is
validated by the instance, whose OpenAI-shaped errors pass through unchanged.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response

from deepflow.gateway.policies import prefix_hashes
from deepflow.gateway.proxy import Proxy, request_cost
from deepflow.gateway.table import KeyCache, RoutingTable
from deepflow.openai_errors import OpenAIError as APIError
from deepflow.store import Tenant
from deepflow.streaming import STREAMED

router = APIRouter(prefix="/v1", tags=["gateway"])


def install(app: FastAPI) -> None:
    db = app.state.db
    app.state.gateway_routes = RoutingTable(db)
    app.state.gateway_keys = KeyCache(db)
    app.state.gateway_proxy = Proxy()
    app.include_router(router)


async def _tenant(request: Request) -> Tenant:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    grant = await request.app.state.gateway_keys.grant(key.strip())
    if grant is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return request.app.state.quotas.admit(grant, request.method)  # type: ignore[no-any-return]


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    tenant = await _tenant(request)
    table: RoutingTable = request.app.state.gateway_routes
    await table.start()
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": tenant.name}
            for name, _ in table.models(tenant.id)
        ],
    }


def _payload(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise APIError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise APIError(400, "model: required field is missing", param="model", code="missing_field")
    return payload


def _prompt_text(payload: dict[str, Any]) -> str:
    """The text routing fingerprints: the prompt, or the messages in order."""
    if "messages" in payload:
        messages = payload["messages"] if isinstance(payload["messages"], list) else []
        parts = []
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                text = content if isinstance(content, str) else json.dumps(content)
                parts.append(f"<{m.get('role')}>{text}")
        return "".join(parts)
    prompt = payload.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


async def _forward(request: Request, path: str) -> Response:
    tenant = await _tenant(request)
    body = await request.body()
    payload = _payload(body)
    table: RoutingTable = request.app.state.gateway_routes
    route = table.route(tenant.id, payload["model"])
    if route is None:
        raise APIError(
            404,
            f"The model '{payload['model']}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    text = _prompt_text(payload)
    cost = request_cost(payload, text)
    request.app.state.quotas.spend_tokens(tenant, cost)
    proxy: Proxy = request.app.state.gateway_proxy
    return await proxy.forward(
        route, path, body, prefix_hashes(text), cost, stream=payload.get("stream") is True
    )


@router.post("/completions", responses=STREAMED)
async def completions(request: Request) -> Response:
    return await _forward(request, "/v1/completions")


@router.post("/chat/completions", responses=STREAMED)
async def chat_completions(request: Request) -> Response:
    return await _forward(request, "/v1/chat/completions")

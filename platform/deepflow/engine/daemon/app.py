"""The daemon's FastAPI app: OpenAI routes, health, Prometheus metrics and drain.

Given API keys, the /v1 routes and /drain want one of them as ``Authorization: Bearer KEY``
(401 otherwise); /health and /metrics stay open for probes and scrapers, as in vLLM.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from deepflow.engine.async_engine import AsyncLLMEngine
from deepflow.engine.daemon import chat, completions
from deepflow.engine.daemon.engine_server import EngineServer
from deepflow.engine.daemon.errors import OpenAIError, error_response, install_error_handlers
from deepflow.engine.daemon.options import DEFAULT_MAX_WAITING
from deepflow.openai_errors import ERROR_RESPONSES


def build_app(
    engine: AsyncLLMEngine,
    served_model_name: str,
    *,
    max_waiting: int = DEFAULT_MAX_WAITING,
    aliases: Sequence[str] = (),
    api_keys: Sequence[str] = (),
) -> FastAPI:
    """One engine behind OpenAI's API. ``app.state.flowserve`` is the EngineServer (the
    serving process watches it for a drain request)."""
    # The schema is not served; the 404 message and tests/fuzz read it with app.openapi().
    app = FastAPI(
        title="FlowServe",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        responses=ERROR_RESPONSES,
    )
    server = EngineServer(engine, served_model_name, max_waiting, aliases)
    app.state.flowserve = server
    install_error_handlers(app)
    keyed = [Depends(_require_key(api_keys))] if api_keys else []
    app.include_router(completions.router, dependencies=keyed)
    app.include_router(chat.router, dependencies=keyed)

    def model_card(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": server.created,
            "owned_by": "deepflow",
            "max_model_len": server.max_model_len,
        }

    @app.get("/v1/models", dependencies=keyed)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in server.model_names]}

    @app.get("/v1/models/{model:path}", dependencies=keyed)
    async def retrieve_model(model: str) -> dict[str, Any]:
        server.check_model(model)
        return model_card(model)

    @app.get("/health")
    async def health() -> Response:
        if server.draining:
            return error_response(503, "the server is draining", None, "draining")
        if server.engine_error is not None:
            return error_response(
                503, f"the engine stopped: {server.engine_error!r}", None, "engine_dead"
            )
        stats = server.stats()
        return JSONResponse(
            {
                "status": "ok",
                "model": server.model_name,
                "running": stats.num_running,
                "waiting": stats.num_waiting,
                "kv_cache_usage": stats.kv_cache_usage,
            }
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/drain", dependencies=keyed)
    async def drain(_: Request) -> dict[str, Any]:
        server.begin_drain()
        stats = server.stats()
        return {
            "status": "draining",
            "open_requests": len(server.active),
            "running": stats.num_running,
            "waiting": stats.num_waiting,
        }

    return app


def _require_key(keys: Sequence[str]) -> Callable[[Request], Awaitable[None]]:
    """A dependency refusing (401) a request without ``Authorization: Bearer`` one of ``keys``."""
    wanted = [key.encode() for key in keys]

    async def require_key(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise OpenAIError(
                401,
                "You didn't provide an API key: send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        token = given.strip().encode()
        if not any(hmac.compare_digest(token, key) for key in wanted):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")

    return require_key

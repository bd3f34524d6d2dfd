"""The daemon's FastAPI app: OpenAI routes, health, Prometheus metrics and drain."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from deepflow.engine.async_engine import AsyncLLMEngine
from deepflow.engine.daemon import chat, completions
from deepflow.engine.daemon.engine_server import EngineServer
from deepflow.engine.daemon.errors import error_response, install_error_handlers

DEFAULT_MAX_WAITING = 1024


def build_app(
    engine: AsyncLLMEngine, served_model_name: str, *, max_waiting: int = DEFAULT_MAX_WAITING
) -> FastAPI:
    """One engine behind OpenAI's API. ``app.state.flowserve`` is the EngineServer (the
    serving process watches it for a drain request)."""
    app = FastAPI(title="FlowServe", docs_url=None, redoc_url=None, openapi_url=None)
    server = EngineServer(engine, served_model_name, max_waiting)
    app.state.flowserve = server
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(chat.router)

    def model_card() -> dict[str, Any]:
        return {
            "id": server.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "deepflow",
            "max_model_len": server.max_model_len,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        server.check_model(model)
        return model_card()

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

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/drain")
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

"""The platform's FastAPI application."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from sqlalchemy import text

from deepflow import __version__
from deepflow.api import (
    batches,
    dashboard,
    deployments,
    docs,
    errors,
    files,
    fine_tuning,
    jobs,
    limits,
)
from deepflow.api.deps import no_nul_parameters
from deepflow.config import Settings
from deepflow.dag import operators
from deepflow.dispatch import Dispatcher
from deepflow.gateway import routes as gateway
from deepflow.openai_errors import ERROR_RESPONSES
from deepflow.quotas import Limits, Quotas
from deepflow.store import Database, get_database


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    operators.load_plugins(settings.operator_modules)
    app = FastAPI(
        title="DeepFlow",
        version=__version__,
        description="Serverless LLM platform: jobs as task DAGs, OpenAI-compatible serving.",
        docs_url=None,  # docs.install serves it from packaged files, not a CDN
        redoc_url=None,
        responses=ERROR_RESPONSES,
        dependencies=[Depends(no_nul_parameters)],
    )
    app.state.settings = settings
    app.state.db = db or get_database(settings.database_url)
    app.state.quotas = Quotas(Limits.defaults(settings))
    app.state.dispatcher = (
        Dispatcher(app.state.db, settings.prefect_api_url) if settings.prefect_api_url else None
    )
    app.add_middleware(limits.BodyLimit, limit=settings.max_body_bytes)
    errors.install(app)
    docs.install(app)
    app.include_router(jobs.router)
    app.include_router(deployments.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(fine_tuning.router)
    gateway.install(app)

    @app.get("/health", tags=["health"])
    def health() -> dict[str, str]:
        """Answers once the database does."""
        with app.state.db.transaction() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    dashboard.install(app)  # last: the page is served at / behind every API route
    return app

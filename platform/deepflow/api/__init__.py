"""The platform's HTTP API (FastAPI): jobs now; OpenAI routes and the dashboard later."""

from deepflow.api.app import create_app

__all__ = ["create_app"]

"""The API's interactive docs: Swagger UI at ``/docs``, served from the platform's own files.

FastAPI's default page loads Swagger UI from a CDN, so it is blank on a machine without
internet; here its files come from the ``swagger-ui-bundle-v2`` distribution, mounted at
``/docs/static``. ReDoc is off: none of our dependencies ships its files. As with FastAPI's
default, the page and ``/openapi.json`` need no key.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS_URL = "/docs"
STATIC_URL = f"{DOCS_URL}/static"


def install(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs``; the app must be built with ``docs_url=None``."""
    app.mount(STATIC_URL, StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        # Behind a proxy's prefix, as FastAPI's own page does.
        root = request.scope.get("root_path", "").rstrip("/")
        static = f"{root}{STATIC_URL}"
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{static}/swagger-ui-bundle.js",
            swagger_css_url=f"{static}/swagger-ui.css",
            swagger_favicon_url=f"{static}/favicon-32x32.png",
        )

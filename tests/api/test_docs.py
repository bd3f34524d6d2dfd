"""``/docs`` serves Swagger UI from the platform's own files: no URL on the page leaves it."""

from __future__ import annotations

import re

from tests.api.conftest import Api

EXTERNAL = re.compile(r"""https?://[^\s'"<>]+""")


def test_docs_page_loads_nothing_from_outside(api: Api) -> None:
    page = api.client.get("/docs")
    assert page.status_code == 200
    assert EXTERNAL.findall(page.text) == []
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    for asset in assets:
        assert api.client.get(asset).status_code == 200, asset


def test_docs_are_public_and_redoc_is_off(api: Api) -> None:
    """The docs need no key (as FastAPI's default page did); ReDoc has no packaged files."""
    assert api.client.get("/openapi.json").status_code == 200
    assert api.client.get("/redoc").status_code == 404

"""The API's Swagger UI at ``/docs`` in headless Chromium with every other host cut off: it
must render from the platform's own files (FastAPI's default page loads them from a CDN and
stays blank offline)."""

from __future__ import annotations

from urllib.parse import urlsplit

from playwright.sync_api import Route, expect

from tests.browser.conftest import BareApi, Tab


def test_docs_render_without_internet(bare_api: BareApi, tab: Tab) -> None:
    page = tab.page
    outside: list[str] = []

    def only_the_platform(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_platform)
    page.goto(f"{bare_api.url}/docs")
    jobs = page.locator('.swagger-ui .opblock-summary-path[data-path="/v1/jobs"]')
    expect(jobs.first).to_be_visible()
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("DeepFlow")
    assert outside == []

"""Browser fixtures: headless Chromium (Debian's, driven by playwright) over real servers.

The platform is the integration tests' ``platform`` fixture (a Prefect server, the flow
runner, a Celery worker and the API), run on the embedded defaults only. ``bare_api`` is a
second API over its own SQLite database and without Prefect, for data the tests insert
through the store (a thousand jobs; a deployment whose replica is the daemon tests' real
FlowServe daemon, ``daemon``): nothing dispatches its jobs.

Every page fails its test on a console error or an uncaught exception, unless the test
said it expects that one (``page_errors.expect``). ``DEEPFLOW_UPDATE_SCREENSHOTS=1`` writes
the screenshots into ``docs/screenshots/`` (committed); otherwise into a temporary folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from deepflow.config import Settings
from deepflow.launcher import ApiServer
from deepflow.store import Database, create_api_key, schema
from tests.conftest import require
from tests.daemon.conftest import daemon, tiny_model  # noqa: F401  (fixtures, reused)
from tests.integration.conftest import REPO, platform  # noqa: F401  (the fixture, reused)

CHROMIUM = os.environ.get("DEEPFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "docs" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require("chromium", Path(CHROMIUM).exists(), "apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class PageErrors:
    """Console errors and uncaught exceptions of a page; ``expect`` allows a pattern once."""

    seen: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def expect(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def add(self, text: str) -> None:
        for allowed in self.allowed:
            if allowed.search(text):
                self.allowed.remove(allowed)
                return
        self.seen.append(text)


@dataclass
class Tab:
    page: Page
    errors: PageErrors


def open_tab(browser: Browser) -> Tab:
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(10_000)
    errors = PageErrors()

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            errors.add(f"console: {msg.text} ({msg.location.get('url')})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.add(f"page error: {exc}"))
    return Tab(page, errors)


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    """A fresh browser tab (its own session storage), checked for errors at the end."""
    tab = open_tab(browser)
    yield tab
    tab.page.context.close()
    assert tab.errors.seen == [], "\n".join(tab.errors.seen)
    assert tab.errors.allowed == [], f"expected errors that never came: {tab.errors.allowed}"


def screenshot(page: Page, name: str, tmp: Path) -> Path:
    folder = SCREENSHOTS if os.environ.get("DEEPFLOW_UPDATE_SCREENSHOTS") == "1" else tmp
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@dataclass
class BareApi:
    url: str
    db: Database
    server: ApiServer

    def key(self, tenant: str) -> str:
        with self.db.transaction() as s:
            return create_api_key(s, tenant)[1]


@pytest.fixture(scope="module")
def bare_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareApi]:
    home = tmp_path_factory.mktemp("bare-api")
    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'deepflow.db'}",
        broker_url="memory://",
        reconcile_interval_s=0.5,  # the reconciler's thread stops within one interval
    )
    schema.upgrade(settings.database_url)
    db = Database(settings.database_url)
    server = ApiServer(settings, db)
    server.server.config.app.state.metrics_history.interval_s = 0.5
    server.start()
    yield BareApi(server.url, db, server)
    server.stop()
    db.dispose()

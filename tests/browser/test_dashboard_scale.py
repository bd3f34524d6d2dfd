"""The dashboard at scale, in headless Chromium over ``bare_api``: a job of 5,000 tasks is
interactive within 2 s (a paged, searchable task table, a graph of collapsed levels), and
other big shapes of DAG are drawn in groups too."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from playwright.sync_api import expect

from deepflow import dag, store
from deepflow.store import claim_task, fail_task, queue_task, succeed_task
from tests.browser.conftest import BareApi, Tab, screenshot
from tests.browser.test_dashboard import log_in

WIDTH = 2499
"""Shards of the fan-out: prepare -> shard-i -> embed-i -> merge is 5,000 tasks."""
TTI_MS = 2000
"""The issue's bar: rows listed and search answering within 2 s of navigation."""


@dataclass
class BigJob:
    key: str
    id: str


def _big_spec() -> dict[str, object]:
    tasks: list[dict[str, object]] = [{"name": "prepare", "operator": "noop"}]
    for i in range(WIDTH):
        tasks.append({"name": f"shard-{i:04}", "operator": "echo", "depends_on": ["prepare"]})
        tasks.append({"name": f"embed-{i:04}", "operator": "noop", "depends_on": [f"shard-{i:04}"]})
    tasks.append(
        {"name": "merge", "operator": "noop", "depends_on": [f"embed-{i:04}" for i in range(WIDTH)]}
    )
    return {"tasks": tasks}


@pytest.fixture(scope="module")
def big_job(bare_api: BareApi) -> BigJob:
    """5,000 tasks mid-run: prepare and shards 0-1499 succeeded, 1500-1539 running, 1540-1546
    failed, the rest pending."""
    key = bare_api.key("scale")
    plan = dag.plan("dag", _big_spec())
    assert len(plan.tasks) == 5000
    with bare_api.db.transaction() as s:
        tenant = store.authenticate(s, key).tenant  # type: ignore[union-attr]
        assert tenant is not None
        job, _ = store.create_job(s, tenant.id, plan, "dag")
        by_name = {t.name: t.id for t in job.tasks}
    ran = ["prepare", *(f"shard-{i:04}" for i in range(1547))]
    for start in range(0, len(ran), 100):  # short transactions: the API's threads write too
        with bare_api.db.transaction() as s:
            for n, name in enumerate(ran[start : start + 100], start):
                task = queue_task(s, by_name[name])
                claim_task(s, task.id, "scale-test", task.attempt, 3600.0)
                if n <= 1500:
                    succeed_task(s, task.id, "scale-test", task.attempt, {"rows": n})
                elif n > 1540:
                    fail_task(s, task.id, "scale-test", task.attempt, f"shard {n - 1} is corrupt")
    return BigJob(key, job.id)


INTERACTIVE = """{
    const rows = () => document.querySelectorAll("#tasks-body tr[data-task]").length;
    const seen = new MutationObserver(() => {
        if (rows() !== 50) return;
        seen.disconnect();
        setTimeout(() => {  // a task of its own: whatever the page still had queued runs first
            const search = document.getElementById("task-search");
            search.value = "shard-1234";
            search.dispatchEvent(new Event("input"));
            const done = () => { window.interactive = { ms: performance.now(), rows: rows() }; };
            requestAnimationFrame(() => setTimeout(done));  // after the answer is painted
        });
    });
    seen.observe(document, { childList: true, subtree: true });
}"""
"""Measured in the page, from its navigation: the first 50 rows are listed, then a search is
typed and its answer drawn. (Measured from the test instead, each step's round trip through
the driver would count too, slowed by the API server answering the page in this process.)"""


def test_a_5000_task_job_is_interactive_within_2_s(
    bare_api: BareApi, big_job: BigJob, tab: Tab, tmp_path: Path
) -> None:
    page = tab.page
    log_in(page, bare_api.url, big_job.key)
    page.add_init_script(INTERACTIVE)
    page.goto("about:blank")  # then a new document (not a hash change): its clock starts at 0
    page.goto(f"{bare_api.url}/#/jobs/{big_job.id}")
    interactive = page.wait_for_function("window.interactive", timeout=30_000).json_value()
    print(f"5,000-task job page interactive after {interactive['ms']:.0f} ms")
    assert interactive["rows"] == 1
    assert interactive["ms"] < TTI_MS

    expect(page.locator("#task-range")).to_have_text("1–1 of 1")
    expect(page.locator('#tasks-body tr[data-task="shard-1234"]')).to_be_visible()
    page.fill("#task-search", "shard fail")  # every word matches name, operator or state
    expect(page.locator("#task-range")).to_have_text("1–7 of 7")
    page.fill("#task-search", "")
    page.select_option("#task-state", "running")
    expect(page.locator("#task-range")).to_have_text("1–40 of 40")
    page.select_option("#task-state", "")
    expect(page.locator("#task-range")).to_have_text("1–50 of 5000")
    page.click("#task-next")
    expect(page.locator("#task-range")).to_have_text("51–100 of 5000")
    expect(page.locator("#gantt-scope")).to_have_text(
        "The 50 tasks listed in the table below, of 5000."
    )
    expect(page.locator("#gantt rect.bar")).to_have_count(25)  # the 25 shards among them ran

    # The graph: the two wide levels as groups with their counts; prepare and merge as boxes.
    groups = page.locator("#dag g.group")
    expect(groups).to_have_count(2)
    assert groups.evaluate_all("gs => gs.map(g => g.dataset.count)") == ["2499", "2499"]
    expect(page.locator("#dag g.node")).to_have_count(2)
    shards = groups.first
    expect(shards).to_have_attribute("data-state", "failed")
    expect(shards.locator('rect.tally[data-state="failed"]')).to_have_attribute("data-count", "7")
    expect(shards.locator('rect.tally[data-state="running"]')).to_have_attribute("data-count", "40")
    elements = page.evaluate("document.getElementsByTagName('*').length")
    assert elements < 3000, f"{elements} elements: the page draws every task"
    screenshot(page, "job-5000-tasks", tmp_path)

    shards.click()  # lists the group's tasks
    expect(page.locator("#task-range")).to_have_text("1–50 of 2499")
    expect(page.locator("#tasks-body tr[data-task]").first).to_have_attribute(
        "data-task", "shard-0000"
    )
    page.click("#task-group-clear")
    expect(page.locator("#task-range")).to_have_text("1–50 of 5000")
    page.locator('#dag g.node[data-task="merge"]').click()
    expect(page.locator("#task-detail h3")).to_have_text("merge")
    expect(page.locator('#tasks-body tr[data-task="merge"]')).to_have_class("row-link selected")


LAYOUT = """async (shapes) => {
    const { layout, MAX_COLUMNS } = await import("./js/charts/dag_layout.js");
    const box = { w: 176, h: 50, gapX: 64, gapY: 18, pad: 12 };
    const units = (tasks) => layout(tasks, box).units.map((u) =>
        u.kind === "task" ? u.name : { from: u.from, to: u.to, count: u.names.length });
    return { max: MAX_COLUMNS, drawn: shapes.map(units) };
}"""


def test_other_big_shapes_are_drawn_in_groups(bare_api: BareApi, tab: Tab) -> None:
    """The layout on its own, in the page: a 5,000-step chain bands its levels into at most
    MAX_COLUMNS groups; one wide level is one group among single boxes; a small DAG is boxes."""
    chain = [
        {"name": f"step-{i}", "depends_on": [f"step-{i - 1}"] if i else []} for i in range(5000)
    ]
    fan = [{"name": "root", "depends_on": []}]
    fan += [{"name": f"leaf-{i}", "depends_on": ["root"]} for i in range(30)]
    small = [{"name": "a", "depends_on": []}, {"name": "b", "depends_on": ["a"]}]
    page = tab.page
    page.goto(f"{bare_api.url}/")
    out = page.evaluate(LAYOUT, [chain, fan, small])
    banded, fanned, plain = out["drawn"]
    assert 1 < len(banded) <= out["max"]
    assert banded[0]["from"] == 0 and banded[-1]["to"] == 4999
    assert all(a["to"] + 1 == b["from"] for a, b in pairwise(banded))
    assert sum(g["count"] for g in banded) == 5000
    assert fanned == ["root", {"from": 1, "to": 1, "count": 30}]
    assert plain == ["a", "b"]

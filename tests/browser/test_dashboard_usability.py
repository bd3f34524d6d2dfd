"""The dashboard's rough edges, in headless Chromium over ``bare_api``: Back closes the
New-job dialog, a deployment's ended replicas sit in a collapsed history instead of the live
table, and a 2,000-character error can be read whole."""

from __future__ import annotations

import json

from playwright.sync_api import Locator, expect

from deepflow import dag, store
from deepflow.dag.spec import ResourceClass
from deepflow.store import (
    InstanceState,
    claim_task,
    create_instance,
    fail_task,
    queue_task,
    set_instance_state,
)
from tests.browser.conftest import BareApi, Tab
from tests.browser.test_dashboard import log_in


def test_back_closes_the_new_job_dialog(bare_api: BareApi, tab: Tab) -> None:
    page = tab.page
    log_in(page, bare_api.url, bare_api.key("dialogs"), "#/deployments")
    page.click('a[data-nav="jobs"]')
    expect(page.locator("h1", has_text="Jobs")).to_be_visible()
    dialog = page.locator("#new-job-dialog")

    page.click("#new-job")
    expect(dialog).to_be_visible()
    page.go_back()
    expect(dialog).to_have_count(0)
    assert page.url.endswith("#/jobs")
    expect(page.locator("h1", has_text="Jobs")).to_be_visible()

    page.click("#new-job")  # closed by Cancel, it leaves no entry for Back to spend
    page.click("#new-job-dialog button.ghost")
    expect(dialog).to_have_count(0)
    page.go_back()
    expect(page.locator("h1", has_text="Deployments")).to_be_visible()
    page.go_forward()
    expect(page.locator("h1", has_text="Jobs")).to_be_visible()

    page.click("#new-job")  # submitted, Back from the new job is the list
    page.fill("#new-job-spec", json.dumps({"tasks": [{"name": "only", "operator": "noop"}]}))
    page.click("#new-job-submit")
    expect(page.locator("#job-id")).to_contain_text("job_")
    expect(dialog).to_have_count(0)
    page.go_back()
    expect(page.locator("h1", has_text="Jobs")).to_be_visible()
    assert page.url.endswith("#/jobs")
    expect(dialog).to_have_count(0)


def test_ended_replicas_leave_the_live_table(bare_api: BareApi, tab: Tab) -> None:
    key = bare_api.key("replicas")
    with bare_api.db.transaction() as s:
        tenant = store.authenticate(s, key).tenant  # type: ignore[union-attr]
        assert tenant is not None
        dep = store.create_deployment(
            s,
            tenant.id,
            name="tiny-llama",
            model_path="/models/tiny-llama",
            replicas=2,
            resource_class=ResourceClass.CPU,
            policy="least_outstanding_tokens",
        )
        common = {"model_name": "tiny-llama", "device": "cpu", "deployment_id": dep.id}
        died, stopped, *ready = (
            create_instance(s, tenant.id, start_path="cold", **common) for _ in range(4)
        )
        s.flush()
        set_instance_state(s, died.id, InstanceState.FAILED, reason="health: refused")
        set_instance_state(s, stopped.id, InstanceState.READY)
        set_instance_state(s, stopped.id, InstanceState.STOPPED, reason="scaled in")
        for instance in ready:  # no address: the supervisor leaves them be (nothing to probe)
            set_instance_state(s, instance.id, InstanceState.READY)
    page = tab.page
    log_in(page, bare_api.url, key, "#/deployments")
    card = page.locator(f'article.deployment[data-deployment="{dep.id}"]')
    live = card.locator("table.instances:not(.ended) tr[data-instance]")
    expect(live).to_have_count(2)
    assert live.evaluate_all("rs => rs.map(r => r.dataset.state)") == ["ready", "ready"]
    history = card.locator("details.history")
    expect(history.locator("summary")).to_have_text("History: 2 ended replicas")
    ended = history.locator("tr[data-instance]")
    expect(ended.first).to_be_hidden()

    history.locator("summary").click()
    expect(ended).to_have_count(2)
    expect(ended.first).to_be_visible()
    assert sorted(ended.evaluate_all("rs => rs.map(r => r.dataset.state)")) == ["failed", "stopped"]
    expect(card.locator(f'tr[data-instance="{died.id}"]')).to_contain_text("health: refused")
    expect(card.locator(f'tr[data-instance="{stopped.id}"]')).to_contain_text("scaled in")
    page.wait_for_timeout(2500)  # a refresh redraws the card; the history stays open
    expect(ended.first).to_be_visible()


def _failed_job(api: BareApi, key: str, tasks: list[dict[str, object]], error: str) -> str:
    """A job whose tasks each ran once and failed with error, advanced by the store."""
    with api.db.transaction() as s:
        tenant = store.authenticate(s, key).tenant  # type: ignore[union-attr]
        assert tenant is not None
        job, _ = store.create_job(s, tenant.id, dag.plan("dag", {"tasks": tasks}), "dag")
        for task in job.tasks:
            queued = queue_task(s, task.id)
            claim_task(s, task.id, "error-test", queued.attempt, 60.0)
            fail_task(s, task.id, "error-test", queued.attempt, error)
        store.advance_job(s, job.id)
        return job.id


def expand_and_read(box: Locator, text: str) -> None:
    """Collapsed, box shows text's start; expanded, all of it, wrapped to the box's width."""
    full = box.locator(".full")
    expect(full).to_be_hidden()
    expect(box.locator("summary")).to_contain_text(f"show all {len(text):,} characters")
    box.locator("summary").click()
    expect(full).to_be_visible()
    expect(full).to_have_text(text)
    assert full.evaluate("e => e.scrollWidth <= e.clientWidth"), "a line runs past the box"


def test_a_long_error_reads_whole(bare_api: BareApi, tab: Tab) -> None:
    key = bare_api.key("errors")
    error = " ".join(f"frame{i:03}:/srv/data/shard/{i}/part-{i:05}.parquet" for i in range(40))
    error = (error + "x" * 2000)[:2000]  # words, then a run of 600 characters with no space
    live = _failed_job(bare_api, key, [{"name": "load", "operator": "fail", "retries": 3}], error)
    names = [f"partition-{i:03}-of-the-nightly-export" for i in range(56)]
    failed = _failed_job(bare_api, key, [{"name": n, "operator": "fail"} for n in names], "boom")
    page = tab.page

    log_in(page, bare_api.url, key, f"#/jobs/{live}?task=load")
    expect(page.locator("#job-state [data-state]")).to_have_attribute("data-state", "running")
    expand_and_read(page.locator("#task-error"), error)
    expand_and_read(page.locator('#attempt-errors li[data-attempt="1"] .error-box'), error)
    page.wait_for_timeout(2500)  # a live refresh redraws the detail; it stays expanded
    expect(page.locator("#task-error .full")).to_be_visible()

    page.goto(f"{bare_api.url}/#/jobs/{failed}")
    job_error = "failed tasks: " + ", ".join(names)
    assert len(job_error) >= 2000
    expect(page.locator("#job-state [data-state]")).to_have_attribute("data-state", "failed")
    expand_and_read(page.locator("#job-error"), job_error)

"""The dashboard in headless Chromium against running servers: log in, create a dag job and
watch its graph finish, read a failed task's log, cancel a running job, see a deployment's
instances and charts, page through a thousand jobs, and keep tenants apart."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from deepflow import dag, store
from deepflow.dag.spec import ResourceClass
from deepflow.store import (
    InstanceState,
    claim_task,
    create_instance,
    fine_tuning,
    queue_task,
    set_instance_state,
    succeed_task,
)
from tests.browser.conftest import BareApi, Tab, open_tab, screenshot
from tests.daemon.conftest import Daemon
from tests.integration.conftest import Platform

EMBEDDED = pytest.mark.parametrize("platform", ["embedded"], indirect=True)
"""The integration tests' platform, on the embedded defaults only."""

LOSS = [[step, round(2.5 * 0.8**step + 0.1, 4)] for step in range(12)]
PIPELINE = {
    "tasks": [
        {"name": "extract", "operator": "echo", "args": {"rows": 3}},
        {
            "name": "train",
            "operator": "echo",
            "args": {"loss_history": LOSS},
            "depends_on": ["extract"],
        },
        {
            "name": "tokenize",
            "operator": "sleep",
            "args": {"seconds": 4},
            "depends_on": ["extract"],
        },
        {"name": "evaluate", "operator": "noop", "depends_on": ["train", "tokenize"]},
        {"name": "report", "operator": "echo", "args": {"ok": True}, "depends_on": ["evaluate"]},
    ]
}


LINE = re.compile(r"^M[\d.]+,[\d.]+( L[\d.]+,[\d.]+)+\s*$")
"""A chart line drawn through two points or more. Not "visible": a flat line (every sample the
same, as a histogram's quantile often is) has no height, and browsers call that hidden."""


def log_in(page: Page, url: str, key: str, path: str = "") -> None:
    page.goto(f"{url}/{path}")
    page.fill("#api-key", key)
    page.click("#login-submit")
    expect(page.locator("#tenant")).to_be_visible()


def node(page: Page, name: str) -> Any:
    return page.locator(f'#dag g.node[data-task="{name}"]')


@EMBEDDED
def test_create_a_dag_job_and_watch_it_succeed(
    platform: Platform, tab: Tab, tmp_path: Path
) -> None:
    page = tab.page
    page.goto(platform.url)
    expect(page.locator("#login-form")).to_be_visible()
    page.fill("#api-key", platform.key)
    screenshot(page, "login", tmp_path)
    page.click("#login-submit")
    expect(page.locator("h1", has_text="Jobs")).to_be_visible()

    page.click("#new-job")
    page.select_option("#new-job-kind", "dag")
    page.fill("#new-job-spec", json.dumps(PIPELINE))
    page.click("#new-job-submit")
    expect(page.locator("#job-id")).to_contain_text("job_")
    expect(node(page, "report")).to_be_visible()
    first_states = page.locator("#dag g.node").evaluate_all("ns => ns.map(n => n.dataset.state)")
    assert len(first_states) == 5 and "succeeded" not in first_states[-1:], first_states
    expect(node(page, "tokenize")).to_have_attribute("data-state", "running", timeout=60_000)

    expect(page.locator("#job-state [data-state]")).to_have_attribute(
        "data-state", "succeeded", timeout=60_000
    )
    for name in ("extract", "train", "tokenize", "evaluate", "report"):
        expect(node(page, name)).to_have_attribute("data-state", "succeeded")
    expect(page.locator("#gantt rect.bar")).to_have_count(5)
    expect(page.locator("#loss-chart path.line")).to_have_count(1)
    assert "/runs/flow-run/" in (page.get_attribute("#prefect-link", "href") or "")
    node(page, "train").click()
    expect(page.locator("#task-output")).to_contain_text("loss_history")
    expect(page.locator("#task-log")).to_have_attribute("data-outcome", "succeeded")
    screenshot(page, "job", tmp_path)


@EMBEDDED
def test_open_a_failed_task_log(platform: Platform, tab: Tab, tmp_path: Path) -> None:
    job = platform.post(
        {
            "tasks": [
                {"name": "fetch", "operator": "echo", "args": {"rows": 1}},
                {
                    "name": "load",
                    "operator": "fail",
                    "args": {"message": "disk /data is full"},
                    "depends_on": ["fetch"],
                    "retries": 1,
                    "retry_delay_s": 0.2,
                },
                {"name": "notify", "operator": "noop", "depends_on": ["load"]},
            ]
        }
    )
    page = tab.page
    log_in(page, platform.url, platform.key, f"#/jobs/{job['id']}")
    expect(page.locator("#job-state [data-state]")).to_have_attribute(
        "data-state", "failed", timeout=60_000
    )
    expect(node(page, "load")).to_have_attribute("data-state", "failed")
    expect(node(page, "notify")).to_have_attribute("data-state", "upstream_failed")
    expect(page.locator("#job-error")).to_contain_text("load")
    node(page, "load").click()
    expect(page.locator("#log-tabs .tab")).to_have_count(2)
    log = page.locator("#task-log")
    expect(log).to_have_attribute("data-attempt", "2")
    expect(log).to_contain_text("Traceback")
    expect(log).to_contain_text("OperatorFailed: disk /data is full")
    page.click('#log-tabs .tab[data-attempt="1"]')
    expect(log).to_have_attribute("data-attempt", "1")
    expect(page.locator("#task-detail .attempts tbody tr")).to_have_count(2)
    screenshot(page, "failed-task-log", tmp_path)


@EMBEDDED
def test_cancel_a_running_job(platform: Platform, tab: Tab) -> None:
    job = platform.post(
        {
            "tasks": [
                {"name": "warmup", "operator": "noop"},
                {
                    "name": "long",
                    "operator": "sleep",
                    "args": {"seconds": 60},
                    "depends_on": ["warmup"],
                },
                {"name": "after", "operator": "noop", "depends_on": ["long"]},
            ]
        }
    )
    page = tab.page
    log_in(page, platform.url, platform.key, f"#/jobs/{job['id']}")
    expect(node(page, "long")).to_have_attribute("data-state", "running", timeout=90_000)
    page.click("#cancel-job")
    expect(page.locator("#job-state [data-state]")).to_have_attribute("data-state", "cancelled")
    expect(node(page, "long")).to_have_attribute("data-state", "cancelled")
    expect(node(page, "after")).to_have_attribute("data-state", "cancelled")
    expect(page.locator("#retry-job")).to_be_visible()
    assert platform.wait(job["id"])["state"] == "cancelled"


@EMBEDDED
def test_list_filters_and_a_second_tenant_sees_nothing(
    platform: Platform, browser: Any, tab: Tab, tmp_path: Path
) -> None:
    failing = platform.post({"tasks": [{"name": "boom", "operator": "fail"}]})
    platform.post({"tasks": [{"name": "hello", "operator": "echo", "args": {"hi": 1}}]})
    assert platform.wait(failing["id"])["state"] == "failed"
    page = tab.page
    log_in(page, platform.url, platform.key)
    expect(page.locator("#jobs-body tr[data-job]").first).to_be_visible()
    listed = page.locator("#jobs-body tr[data-job]").count()
    assert listed >= 2
    page.select_option("#state-filter", "failed")
    expect(page.locator("#jobs-body tr[data-job] [data-state]").first).to_have_attribute(
        "data-state", "failed"
    )
    page.select_option("#state-filter", "")
    expect(page.locator("#page-range")).to_have_text(f"1–{listed} of {listed}")
    screenshot(page, "jobs", tmp_path)
    acme_job = page.locator("#jobs-body tr[data-job]").first.get_attribute("data-job")

    with platform.db.transaction() as s:
        _, other = store.create_api_key(s, "globex")
    second = open_tab(browser)
    try:
        log_in(second.page, platform.url, other)
        expect(second.page.locator("#tenant")).to_contain_text("globex")
        expect(second.page.locator("#jobs-body td.empty")).to_contain_text("No jobs yet")
        expect(second.page.locator("#page-range")).to_have_text("0–0 of 0")
        second.errors.expect(r"404")  # the direct link to acme's job is answered 404
        second.page.goto(f"{platform.url}/#/jobs/{acme_job}")
        expect(second.page.locator(".error-box")).to_contain_text("No job")
        assert second.errors.seen == [] and second.errors.allowed == []
    finally:
        second.page.context.close()


def _deployment(api: BareApi, tenant_key: str, daemon: Daemon, model_dir: Path) -> str:
    """A deployment of one replica, served by a real FlowServe daemon, with the replica it
    replaced (failed) in its history."""
    with api.db.transaction() as s:
        tenant = store.authenticate(s, tenant_key).tenant  # type: ignore[union-attr]
        assert tenant is not None
        dep = store.create_deployment(
            s,
            tenant.id,
            name=daemon.model,
            model_path=str(model_dir),
            replicas=1,
            resource_class=ResourceClass.CPU,
            policy="least_outstanding_tokens",
        )
        common = {"model_name": daemon.model, "device": "cpu", "deployment_id": dep.id}
        old = create_instance(s, tenant.id, start_path="cold", **common)
        new = create_instance(
            s,
            tenant.id,
            address=daemon.url,
            start_path="cold",
            host=socket.gethostname(),
            pid=daemon.proc.pid,
            **common,
        )
        s.flush()
        set_instance_state(s, old.id, InstanceState.FAILED, reason="health: refused")
        set_instance_state(s, new.id, InstanceState.READY)
        return dep.id


def _finetune_with_loss(api: BareApi, tenant_key: str) -> None:
    with api.db.transaction() as s:
        tenant = store.authenticate(s, tenant_key).tenant  # type: ignore[union-attr]
        assert tenant is not None
        spec = {"model": "tiny-llama", "training_file": "file-train.jsonl"}
        job, _ = store.create_job(s, tenant.id, dag.plan("finetune", spec), "finetune")
    for task in (t for t in job.tasks if t.name in ("validate_data", "tokenize")):
        with api.db.transaction() as s:
            queued = queue_task(s, task.id)
            claim_task(s, task.id, "browser-test", queued.attempt, 30.0)
            succeed_task(s, task.id, "browser-test", queued.attempt, {"rows": 100})
    with api.db.transaction() as s:  # what the training loop records, step by step
        for step, loss in LOSS[1:]:
            held_out = loss + 0.05 if step % 4 == 0 else None
            fine_tuning.record_step(
                s, job.id, job.tenant_id, step=step, epoch=0, train_loss=loss, tokens=50,
                learning_rate=1e-3, valid_loss=held_out,
            )  # fmt: skip


def test_deployment_instances_charts_and_loss(
    bare_api: BareApi, daemon: Daemon, tiny_model: Path, tab: Tab, tmp_path: Path
) -> None:
    key = bare_api.key("serving-team")
    deployment = _deployment(bare_api, key, daemon, tiny_model)
    _finetune_with_loss(bare_api, key)
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=daemon.url, timeout=60) as client:
            i = 0
            while not stop.wait(0.05):
                i += 1
                body = {"model": daemon.model, "prompt": f"Count to {i}:", "max_tokens": 4 + i % 8}
                assert client.post("/v1/completions", json=body).status_code == 200

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        page = tab.page
        log_in(page, bare_api.url, key, "#/deployments")
        card = page.locator(f'article.deployment[data-deployment="{deployment}"]')
        expect(card).to_be_visible()
        expect(card.locator("tr[data-instance]")).to_have_count(2)
        expect(card.locator('[data-health="healthy"]')).to_have_count(1)
        expect(card.locator("tr[data-state=failed]")).to_have_count(1)
        expect(card.locator(".badge[data-state=ready]").first).to_be_visible()
        expect(card.locator("svg.timeline circle.event-dot")).to_have_count(6)
        ttft = page.locator(f'[id="{deployment}-ttft"]')
        expect(ttft.locator("path.line").first).to_have_attribute("d", LINE, timeout=15_000)
        page.wait_for_timeout(2500)  # a few more points, for the picture
        screenshot(page, "deployments", tmp_path)

        page.click('a[data-nav="metrics"]')
        expect(page.locator("#deployment-picker")).to_have_value(deployment)
        for chart in ("m-ttft", "m-tpot", "m-throughput", "m-load", "m-kv"):
            expect(page.locator(f"#{chart} path.line").first).to_have_attribute("d", LINE)
        # The fine-tuning job's curve: training loss and held-out loss.
        expect(page.locator("#loss-curves figure path.line")).to_have_count(2)
        screenshot(page, "metrics", tmp_path)
    finally:
        stop.set()
        thread.join()
    daemon.wait_idle()


def test_a_thousand_jobs_stay_usable(bare_api: BareApi, tab: Tab, tmp_path: Path) -> None:
    key = bare_api.key("bigco")
    plan = dag.plan(
        "dag",
        {
            "tasks": [
                {"name": "a", "operator": "noop"},
                {"name": "b", "operator": "noop", "depends_on": ["a"]},
            ]
        },
    )
    with bare_api.db.transaction() as s:
        tenant = store.authenticate(s, key).tenant  # type: ignore[union-attr]
        assert tenant is not None
        ids = [store.create_job(s, tenant.id, plan, "dag")[0].id for _ in range(1000)]
        for job_id in ids[::3]:
            store.cancel_job(s, tenant.id, job_id)
    page = tab.page
    log_in(page, bare_api.url, key)
    expect(page.locator("#page-range")).to_have_text("1–50 of 1000")
    expect(page.locator("#jobs-body tr[data-job]")).to_have_count(50)
    screenshot(page, "jobs-1000", tmp_path)
    page.click("#next-page")
    expect(page.locator("#page-range")).to_have_text("51–100 of 1000")
    page.select_option("#state-filter", "cancelled")
    expect(page.locator("#page-range")).to_have_text("1–50 of 334")
    page.select_option("#state-filter", "")
    page.fill("#job-search", ids[500][-12:])
    expect(page.locator("#page-range")).to_have_text("1–1 of 1")
    expect(page.locator(f'#jobs-body tr[data-job="{ids[500]}"]')).to_be_visible()
    page.locator(f'#jobs-body tr[data-job="{ids[500]}"]').click()
    expect(page.locator("#job-id")).to_have_text(ids[500])

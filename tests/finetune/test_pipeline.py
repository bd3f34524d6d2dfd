"""A scheduled post-training pipeline on real processes: a Prefect deployment with a cron
schedule a minute apart runs twice; each run fine-tunes the served model, promotes it only when
its held-out loss is lower than the served version's, and rolls the deployment to it while
clients keep calling through the gateway without a failed request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from deepflow.flows.pipeline import schedule_pipeline
from deepflow.flows.worker import WORK_POOL
from deepflow.store import Instance, authenticate, read_model
from tests.finetune.conftest import TRAIN_FILE, VALID_FILE
from tests.integration.conftest import Platform, platform_up
from tests.replicas.conftest import MODEL, register_model, wait_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUNS_WITHIN_S = 300.0
"""Two minute boundaries, the runs themselves (seconds of training on the tiny model, a
rolling update of one replica) and the scheduler's and worker's polling."""


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    from deepflow.engine.testmodel import make_test_model

    folder = make_test_model(tmp_path_factory.mktemp("model") / MODEL, "llama", "tiny")
    with platform_up("embedded", tmp_path_factory.mktemp("pipeline"), workers=2) as p:
        register_model(p.db, folder)
        yield p


def _upload(platform: Platform, path: Any) -> str:
    r = httpx.post(
        f"{platform.url}/v1/files",
        headers=platform.headers(),
        files={"file": (path.name, path.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def _flow_runs(url: str, deployment_id: str) -> list[Any]:
    async def read() -> list[Any]:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        async with get_client() as client:
            ids = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            return await client.read_flow_runs(deployment_filter=ids)

    with temporary_settings({PREFECT_API_URL: url}):
        return asyncio.run(read())


def test_a_scheduled_pipeline_promotes_only_a_better_version(platform: Platform) -> None:
    r = platform.call("POST", "/v1/deployments", {"model": MODEL, "replicas": 1})
    assert r.status_code == 201, r.text
    deployment_id = r.json()["id"]
    wait_deployment(platform, deployment_id, "ready", ready=1)
    spec = {
        "model": MODEL,
        "training_file": _upload(platform, TRAIN_FILE),
        "validation_file": _upload(platform, VALID_FILE),
        "method": {"supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}},
        "checkpoint_every": 4,
    }
    url = platform.settings.prefect_api_url
    assert url is not None
    with temporary_settings({PREFECT_API_URL: url}):
        made = asyncio.run(schedule_pipeline("nightly", "* * * * *", spec, "acme", WORK_POOL))

    client = openai.OpenAI(base_url=f"{platform.url}/v1", api_key=platform.key, max_retries=0)
    stop, failures, served = threading.Event(), [], [0]

    def load() -> None:
        while not stop.is_set():
            try:
                client.completions.create(
                    model=MODEL, prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True}
                )
                served[0] += 1
            except Exception as exc:
                failures.append(repr(exc))
            time.sleep(0.05)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    deadline = time.monotonic() + RUNS_WITHIN_S
    try:
        while True:
            jobs = platform.call("GET", "/v1/jobs?kind=pipeline&limit=10").json()["data"]
            done = [j for j in jobs if j["state"] in ("succeeded", "failed", "cancelled")]
            if len(done) >= 2:
                break
            assert time.monotonic() < deadline, jobs
            time.sleep(1)
    finally:
        stop.set()
        thread.join()
        with temporary_settings({PREFECT_API_URL: url}):  # no third run
            asyncio.run(_pause(made))
    assert not failures, failures[:3]
    assert served[0] > 0

    runs = sorted(done, key=lambda j: j["created_at"])[:2]
    assert [j["state"] for j in runs] == ["succeeded", "succeeded"], runs
    decisions = []
    for job in runs:
        tasks = {t["name"]: t for t in platform.job(job["id"])["tasks"]}
        decision = tasks["promote"]["output"]
        assert decision["promoted"] == (decision["valid_loss"] < decision["base_valid_loss"])
        decisions.append(decision)
    print(
        "pipeline decisions:",
        [(d["promoted"], d["base_valid_loss"], d["valid_loss"]) for d in decisions],
    )
    assert decisions[0]["promoted"], decisions[0]  # a random model is easily bettered
    flow_runs = _flow_runs(url, made)
    assert len(flow_runs) >= 2 and all(fr.auto_scheduled for fr in flow_runs[:2])

    ready = [
        i["id"]
        for i in wait_deployment(platform, deployment_id, "ready", ready=1)["instances"]
        if i["state"] == "ready"
    ]
    promoted = [d for d in decisions if d["promoted"]]
    with platform.db.transaction() as s:
        tenant = authenticate(s, platform.key).tenant  # type: ignore[union-attr]
        versions = sorted(read_model(s, tenant.id, MODEL).versions, key=lambda v: v.version)
        assert len(versions) == 1 + len(promoted)
        assert versions[-1].details["metrics"]["valid_loss"] == promoted[-1]["valid_loss"]
        live = [s.get(Instance, i) for i in ready]
        assert {i.model_path for i in live if i is not None} == {promoted[-1]["uri"]}


async def _pause(deployment_id: str) -> None:
    from uuid import UUID

    async with get_client() as client:
        await client.pause_deployment(UUID(deployment_id))

"""Tenant isolation on every route: another tenant's key can neither read, change nor route
to a tenant's jobs, task logs, models, deployments, files, fine-tuning jobs or batches, nor see
them in any list.

Routes are taken from the app's OpenAPI document, so a route added later is checked too (or
fails the test until it is given a place here)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deepflow.store import (
    Job,
    ModelVersionState,
    ensure_tenant,
    register_model_version,
    set_model_version_state,
)
from deepflow.store.logs import write_task_log
from deepflow.store.types import utcnow
from tests.api.conftest import Api, ready_deployment, serve

SECRET_MODEL = "acme-secret-model"
SECRET_FILE = "acme-secret.jsonl"
SECRET_LINE = (
    b'{"messages": [{"role": "user", "content": "acme secret"}, '
    b'{"role": "assistant", "content": "ok"}]}\n'
)
PUBLIC = {"/health", "/ui/api/session"}
"""Routes that name no tenant's resources (the session route describes the caller)."""
BODIES: dict[tuple[str, str], Any] = {
    ("PATCH", "/v1/deployments/{deployment_id}"): {"replicas": 5},
    ("POST", "/v1/jobs"): {"kind": "dag", "spec": {"tasks": [{"name": "x", "operator": "noop"}]}},
    ("POST", "/v1/deployments"): {"model": SECRET_MODEL},
    ("POST", "/v1/chat/completions"): {
        "model": SECRET_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
    },
    ("POST", "/v1/completions"): {"model": SECRET_MODEL, "prompt": "hi"},
    ("POST", "/v1/fine_tuning/jobs"): {"model": SECRET_MODEL, "training_file": "file-x"},
    ("POST", "/v1/batches"): {
        "input_file_id": "file-x",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    },
}
SECRET_BATCH_LINE = (
    b'{"custom_id": "acme-1", "method": "POST", "url": "/v1/chat/completions", "body": '
    b'{"model": "acme-secret-model", "messages": [{"role": "user", "content": "acme secret"}]}}\n'
)


def _acme_world(api: Api, address: str, model: Path) -> dict[str, str]:
    """acme's job (with a task log), model (``model``'s folder) and deployment with a ready
    instance at ``address``, a file, a fine-tuning job and a batch; returns the values of every
    path parameter."""
    job = api.client.post(
        "/v1/jobs", json=BODIES[("POST", "/v1/jobs")], headers=api.headers()
    ).json()
    with api.db.transaction() as s:
        acme = ensure_tenant(s, "acme")
        version = register_model_version(s, acme.id, SECRET_MODEL, str(model))
        set_model_version_state(s, version.id, ModelVersionState.READY)
        dep = ready_deployment(s, acme.id, SECRET_MODEL, address)
        row = s.get(Job, job["id"])
        assert row is not None
        now = utcnow()
        write_task_log(
            s,
            row.tasks[0],
            1,
            outcome="succeeded",
            text="acme's secret log line",
            dropped_chars=0,
            started_at=now - timedelta(seconds=1),
            finished_at=now,
        )
    upload = api.client.post(
        "/v1/files",
        files={"file": (SECRET_FILE, SECRET_LINE)},
        data={"purpose": "fine-tune"},
        headers=api.headers(),
    )
    assert upload.status_code == 200, upload.text
    tuning = api.client.post(
        "/v1/fine_tuning/jobs",
        json={"model": SECRET_MODEL, "training_file": upload.json()["id"]},
        headers=api.headers(),
    )
    assert tuning.status_code == 200, tuning.text
    batch_file = api.client.post(
        "/v1/files",
        files={"file": ("acme-batch.jsonl", SECRET_BATCH_LINE)},
        data={"purpose": "batch"},
        headers=api.headers(),
    )
    body = {**BODIES[("POST", "/v1/batches")], "input_file_id": batch_file.json()["id"]}
    batch = api.client.post("/v1/batches", json=body, headers=api.headers())
    assert batch.status_code == 200, batch.text
    return {
        "job_id": job["id"],
        "deployment_id": dep.id,
        "task_name": "x",
        "file_id": upload.json()["id"],
        "fine_tuning_job_id": tuning.json()["id"],
        "batch_id": batch.json()["id"],
    }


def test_another_tenant_reaches_nothing_of_a_tenant_by_any_route(
    api: Api, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from deepflow.engine.testmodel import make_test_model

    model = make_test_model(tmp_path_factory.mktemp("secret") / "model", "llama", "tiny")
    hits: list[str] = []

    async def instance(request: Request) -> JSONResponse:
        hits.append(request.url.path)
        return JSONResponse({"object": "chat.completion", "choices": []})

    stub = Starlette(
        routes=[
            Route(p, instance, methods=["POST"])
            for p in ("/v1/chat/completions", "/v1/completions")
        ]
    )
    with serve(stub) as address:
        ids = _acme_world(api, address, model)
        secrets = [ids["job_id"], ids["deployment_id"], SECRET_MODEL, "acme's secret log line"]
        secrets += [ids["file_id"], SECRET_FILE, "acme secret"]
        secrets += [ids["fine_tuning_job_id"], ids["batch_id"], str(model)]
        # acme itself can route to its model: the stub answers
        body = BODIES[("POST", "/v1/chat/completions")]
        assert (
            api.client.post("/v1/chat/completions", json=body, headers=api.headers()).status_code
            == 200
        )
        assert hits == ["/v1/chat/completions"]
        hits.clear()

        paths = api.client.get("/openapi.json").json()["paths"]
        assert not [p for p in paths if "key" in p], "API keys are made and revoked by the CLI only"
        checked = 0
        for path, operations in paths.items():
            params = re.findall(r"{(\w+)}", path)
            for method in (m.upper() for m in operations):
                url = path.format(**ids)
                r = api.client.request(
                    method, url, json=BODIES.get((method, path)), headers=api.headers(api.other_key)
                )
                where = f"{method} {path}: {r.status_code} {r.text[:300]}"
                assert r.status_code < 500, where
                if params:  # one of acme's resources, named by id: as if it did not exist
                    assert r.status_code == 404, where
                    assert r.json()["error"]["type"] == "invalid_request_error", where
                elif path in PUBLIC or method == "GET":
                    assert r.status_code == 200, where
                elif path in ("/v1/chat/completions", "/v1/completions"):
                    assert r.status_code == 404, where
                    assert r.json()["error"]["code"] == "model_not_found", where
                elif path == "/v1/deployments":  # globex has no model of that name
                    assert r.status_code == 404, where
                elif path == "/v1/files":  # a JSON body, not the multipart upload
                    assert r.status_code == 400, where
                elif path in ("/v1/fine_tuning/jobs", "/v1/batches"):  # no such model or file
                    assert r.status_code in (400, 404), where
                else:
                    assert path == "/v1/jobs" and r.status_code == 201, where
                asked = url + str(BODIES.get((method, path)))  # what an error may echo
                leaked = [s for s in secrets if s in r.text and s not in asked]
                assert not leaked, f"{where} shows acme's {leaked}"
                checked += 1
        assert checked >= 20
        assert hits == [], "another tenant's request reached acme's instance"

    # and nothing of acme's changed
    job = api.client.get(f"/v1/jobs/{ids['job_id']}", headers=api.headers()).json()
    assert job["state"] != "cancelled"
    dep = api.client.get(f"/v1/deployments/{ids['deployment_id']}", headers=api.headers()).json()
    assert dep["replicas"] == 1 and dep["state"] not in ("deleting", "deleted")
    jobs = api.client.get("/v1/jobs", headers=api.headers()).json()["data"]
    # acme's three (its DAG, fine-tuning and batch jobs); globex's job is globex's alone
    assert sorted(j["kind"] for j in jobs) == ["batch", "dag", "finetune"]
    assert {ids["job_id"], ids["fine_tuning_job_id"]} <= {j["id"] for j in jobs}
    tuning_id = ids["fine_tuning_job_id"]
    tuning = api.client.get(f"/v1/fine_tuning/jobs/{tuning_id}", headers=api.headers())
    assert tuning.json()["status"] == "validating_files"
    batch = api.client.get(f"/v1/batches/{ids['batch_id']}", headers=api.headers())
    assert batch.json()["status"] not in ("cancelling", "cancelled")
    content = api.client.get(f"/v1/files/{ids['file_id']}/content", headers=api.headers())
    assert content.content == SECRET_LINE


def test_a_job_cannot_name_the_platforms_own_operators(api: Api) -> None:
    """The deploy operators act on whatever instance or deployment their args name: a user's
    DAG naming one (to stop another tenant's instance, say) is refused before it is stored."""
    from deepflow.dag import operators

    internal = [n for n in operators.names() if operators.get(n).internal]
    assert "deploy.stop_instance" in internal and "deploy.launch_replica" in internal
    for name in internal:
        victim = {"name": "x", "operator": name, "args": {"instance_id": "inst_x"}}
        spec = {"tasks": [{"name": "t", "operator": "noop"}, victim]}
        r = api.client.post("/v1/jobs", json={"kind": "dag", "spec": spec}, headers=api.headers())
        assert r.status_code == 400, (name, r.text)
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("operator_not_allowed", "spec.tasks[1].operator")
    assert api.client.get("/v1/jobs", headers=api.headers()).json()["data"] == []

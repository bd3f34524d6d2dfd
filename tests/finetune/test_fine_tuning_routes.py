"""The fine-tuning routes on the API alone (no workers, so a job stays where it is put): its
OpenAI shape, pause / resume / cancel and their conflicts, another tenant's view, and the
refusals of create, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deepflow.store import (
    ModelVersionState,
    authenticate,
    register_model_version,
    set_model_version_state,
)
from deepflow.store import fine_tuning as runs
from tests.api.conftest import Api, api  # noqa: F401  (the fixture)
from tests.finetune.conftest import TRAIN_FILE

BASE = "tiny"


def _setup(api: Api, tiny_model: Path) -> str:  # noqa: F811
    with api.db.transaction() as s:
        tenant = authenticate(s, api.key).tenant  # type: ignore[union-attr]
        version = register_model_version(s, tenant.id, BASE, str(tiny_model))
        set_model_version_state(s, version.id, ModelVersionState.READY)
    r = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": ("train.jsonl", TRAIN_FILE.read_bytes())},
        data={"purpose": "fine-tune"},
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def _post(api: Api, path: str, body: Any = None, key: str | None = None) -> Any:  # noqa: F811
    return api.client.post(f"/v1/fine_tuning/jobs{path}", json=body, headers=api.headers(key))


def test_a_job_in_openai_shape_paused_resumed_and_cancelled(
    api: Api,  # noqa: F811
    tiny_model: Path,
) -> None:
    training_file = _setup(api, tiny_model)
    r = _post(api, "", {"model": BASE, "training_file": training_file, "suffix": "x",
                        "hyperparameters": {"n_epochs": 2, "batch_size": "auto"}})  # fmt: skip
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "validating_files"
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
    }
    assert job["method"]["type"] == "supervised" and job["method"]["supervised"]["lora"] is None
    assert (job["model"], job["training_file"], job["fine_tuned_model"]) == (
        BASE,
        training_file,
        None,
    )
    job_id = job["id"]
    assert _post(api, f"/{job_id}/pause").json()["status"] == "paused"
    assert _post(api, f"/{job_id}/pause").json()["status"] == "paused"  # idempotent
    with api.db.transaction() as s:
        assert runs.is_paused(s, job_id)
    assert _post(api, f"/{job_id}/resume").json()["status"] == "validating_files"
    listed = api.client.get("/v1/fine_tuning/jobs", headers=api.headers()).json()
    assert [j["id"] for j in listed["data"]] == [job_id]
    events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=api.headers()).json()
    assert events["data"] and all(e["object"] == "fine_tuning.job.event" for e in events["data"])

    # Another tenant sees nothing and can change nothing.
    other = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers(api.other_key))
    assert other.status_code == 404
    assert _post(api, f"/{job_id}/cancel", key=api.other_key).status_code == 404
    assert _post(api, f"/{job_id}/pause", key=api.other_key).status_code == 404

    assert _post(api, f"/{job_id}/cancel").json()["status"] == "cancelled"
    for action in ("pause", "resume", "cancel"):
        r = _post(api, f"/{job_id}/{action}")
        assert r.status_code == 409, (action, r.text)
    # A job of another kind is not a fine-tuning job.
    noop = {"kind": "dag", "spec": {"tasks": [{"name": "a", "operator": "noop"}]}}
    dag_job = api.client.post("/v1/jobs", headers=api.headers(), json=noop)
    missing = api.client.get(f"/v1/fine_tuning/jobs/{dag_job.json()['id']}", headers=api.headers())
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        ({"model": "nope"}, "model", "no ready version"),
        ({"training_file": "file-nope"}, "training_file", "no file"),
        ({"validation_file": "file-nope"}, "validation_file", "no file"),
        ({"hyperparameters": {"n_epochs": 0}}, "method.supervised.hyperparameters.n_epochs", ""),
        ({"method": {"type": "dpo"}}, "method.type", ""),
        ({"method": {"supervised": {"lora": {"rank": 0}}}}, "method.supervised.lora.rank", ""),
        ({"integrations": [{"type": "wandb"}]}, "integrations", ""),
        ({"suffix": "a b"}, "suffix", ""),
    ],
)
def test_create_refusals_name_the_field_and_store_nothing(
    api: Api,  # noqa: F811
    tiny_model: Path,
    change: dict[str, Any],
    param: str,
    says: str,
) -> None:
    training_file = _setup(api, tiny_model)
    r = _post(api, "", {"model": BASE, "training_file": training_file} | change)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert api.client.get("/v1/jobs", headers=api.headers()).json()["data"] == []


def test_a_file_for_batches_is_not_training_data(api: Api, tiny_model: Path) -> None:  # noqa: F811
    _setup(api, tiny_model)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": BASE, "prompt": "hi"}}  # fmt: skip
    r = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "batch"},
                        files={"file": ("b.jsonl", json.dumps(line).encode())})  # fmt: skip
    refused = _post(api, "", {"model": BASE, "training_file": r.json()["id"]})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_file_purpose"

"""Deployments end to end on real processes: deploy jobs launch engine daemons through the
Celery worker, the gateway routes the official openai client to them, a killed instance is
replaced, and scaling and deleting go through deploy jobs too."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Platform
from tests.replicas.conftest import MODEL, deployment, wait_deployment

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def deployed(serving: Platform) -> dict[str, Any]:
    r = serving.call(
        "POST",
        "/v1/deployments",
        {"model": MODEL, "replicas": 2, "engine_args": {"max_num_seqs": 8}},
    )
    assert r.status_code == 201, r.text
    return wait_deployment(serving, r.json()["id"], "ready", ready=2)


@pytest.fixture
def client(serving: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serving.url}/v1", api_key=serving.key, max_retries=0)


def test_deployment_runs_its_replicas_as_daemons(
    serving: Platform, deployed: dict[str, Any]
) -> None:
    assert {i["state"] for i in deployed["instances"]} == {"ready"}
    for instance in deployed["instances"]:
        assert instance["address"].startswith("http://127.0.0.1:")
        assert instance["pid"] and instance["start_path"] == "cold"
        assert httpx.get(f"{instance['address']}/health").json()["status"] == "ok"
        os.kill(instance["pid"], 0)  # alive
    job = serving.job(deployed["job_id"])
    assert job["kind"] == "deploy" and job["state"] == "succeeded"
    assert {t["name"] for t in job["tasks"]} >= {"launch_replica_0", "launch_replica_1"}


def test_openai_client_through_the_gateway(deployed: dict[str, Any], client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    always = {"ignore_eos": True}  # random weights may sample EOS at once
    completion = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, extra_body=always
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        n=2,
        seed=1,
        extra_body=always,
    )
    assert len(chat.choices) == 2 and chat.usage is not None
    assert chat.usage.completion_tokens == 8
    messages = [{"role": "user", "content": "Stream please"}]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=always,
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body=always,  # type: ignore[arg-type]
    )
    assert streamed == whole.choices[0].message.content
    greedy = (
        client.completions.create(
            model=MODEL, prompt="abc", max_tokens=12, temperature=0, extra_body=always
        )
        .choices[0]
        .text
    )
    stop = next(greedy[i : i + 2] for i in range(3, len(greedy) - 1) if greedy[i : i + 2].strip())
    stopped = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=12, temperature=0, stop=[stop], extra_body=always
    ).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == greedy[: greedy.index(stop)]


def test_gateway_errors_are_the_clients_own_exceptions(
    serving: Platform, deployed: dict[str, Any], client: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=-1)
    assert bad.value.param == "temperature"
    anonymous = openai.OpenAI(base_url=f"{serving.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_other_tenants_see_no_models(serving: Platform, deployed: dict[str, Any]) -> None:
    from deepflow.store import create_api_key

    with serving.db.transaction() as s:
        _, key = create_api_key(s, "other")
    other = openai.OpenAI(base_url=f"{serving.url}/v1", api_key=key, max_retries=0)
    assert other.models.list().data == []
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=MODEL, prompt="x", max_tokens=1)
    r = httpx.get(f"{serving.url}/v1/deployments/{deployed['id']}", headers=serving.headers(key))
    assert r.status_code == 404


def test_killed_instance_is_replaced(serving: Platform, deployed: dict[str, Any]) -> None:
    victim = deployment(serving, deployed["id"])["instances"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _state(serving, deployed["id"], victim["id"]) != "failed":
        assert time.monotonic() < deadline, "the killed instance was not noticed"
        time.sleep(0.2)
    d = wait_deployment(serving, deployed["id"], "ready", ready=2)
    states = {i["id"]: i["state"] for i in d["instances"]}
    assert states[victim["id"]] == "failed"
    assert d["job_id"] != deployed["job_id"]  # a new deploy job launched the replacement
    assert serving.wait(d["job_id"])["state"] == "succeeded"


def _state(serving: Platform, deployment_id: str, instance_id: str) -> str:
    instances = deployment(serving, deployment_id)["instances"]
    return next(i["state"] for i in instances if i["id"] == instance_id)


def test_scale_in_then_delete_stops_every_daemon(
    serving: Platform, deployed: dict[str, Any]
) -> None:
    instances = deployment(serving, deployed["id"])["instances"]
    before = {i["id"] for i in instances if i["state"] == "ready"}
    r = serving.call("PATCH", f"/v1/deployments/{deployed['id']}", {"replicas": 1})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while True:
        d = wait_deployment(serving, deployed["id"], "ready", ready=1)
        stopped = [i for i in d["instances"] if i["state"] == "stopped"]
        if stopped:
            break
        assert time.monotonic() < deadline, d
        time.sleep(0.2)
    assert len(stopped) == 1 and stopped[0]["id"] in before
    pids = [i["pid"] for i in d["instances"] if i["state"] == "ready"]
    r = serving.call("DELETE", f"/v1/deployments/{deployed['id']}")
    assert r.status_code == 200 and r.json()["state"] == "deleting"
    d = wait_deployment(serving, deployed["id"], "deleted")
    assert {i["state"] for i in d["instances"]} <= {"stopped", "failed"}
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_model_that_cannot_start_fails_its_deployment_once(
    serving: Platform, tmp_path: Path
) -> None:
    from deepflow.store import (
        ModelVersionState,
        ensure_tenant,
        register_model_version,
        set_model_version_state,
    )

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with serving.db.transaction() as s:
        owner = ensure_tenant(s, "acme")
        version = register_model_version(s, owner.id, "broken", str(broken))
        set_model_version_state(s, version.id, ModelVersionState.READY)
    r = serving.call("POST", "/v1/deployments", {"model": "broken"})
    assert r.status_code == 201, r.text
    d = wait_deployment(serving, r.json()["id"], "failed")
    job = serving.wait(d["job_id"])
    assert job["state"] == "failed"
    launch = next(t for t in job["tasks"] if t["name"] == "launch_replica_0")
    assert launch["state"] == "failed" and launch["attempt"] == 3
    assert "engine daemon exited" in launch["error"]
    assert {i["state"] for i in d["instances"]} == {"failed"}
    time.sleep(3)  # the supervisor does not keep relaunching a failed deployment
    assert deployment(serving, d["id"])["job_id"] == d["job_id"]

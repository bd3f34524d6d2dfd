"""``deploy.launch_replica`` called directly (no Prefect, no Celery), on the real database and
a real engine daemon: the address comes from the daemon's report, a failed start leaves a
failed instance and the daemon's reason."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepflow import dag, store
from deepflow.dag.operators import OperatorFailed
from deepflow.dag.spec import ResourceClass
from deepflow.procutil import signal_alive, wait_gone
from deepflow.replicas.operators import health_check, launch_replica, stop_instance
from deepflow.store import Database, Instance, InstanceState

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deepflow.engine.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "tiny", "llama", "tiny")


@pytest.fixture
def platform_env(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Database:
    """The settings the operators read, pointing at ``db`` and a fresh home."""
    monkeypatch.setenv("DEEPFLOW_DATABASE_URL", db.url)
    monkeypatch.setenv("DEEPFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPFLOW_INSTANCE_HOST", "127.0.0.1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return db


def deploy_job(db: Database, model_path: Path, name: str) -> dict[str, Any]:
    """A deployment and its deploy job; the args ``launch_replica`` gets for replica 0."""
    with db.transaction() as s:
        tenant = store.ensure_tenant(s, "acme")
        deployment = store.create_deployment(
            s,
            tenant.id,
            name=name,
            model_path=str(model_path),
            replicas=1,
            resource_class=ResourceClass.CPU,
            policy="colocated",
            engine_args={"num_kv_blocks": 64, "max_num_seqs": 2},
        )
        spec = {"deployment_id": deployment.id, "launch": 1}
        job, _ = store.create_job(s, tenant.id, dag.plan("deploy", spec), "deploy")
    context = {"job_id": job.id, "tenant_id": tenant.id, "upstream": {}}
    return {"deployment_id": deployment.id, "replica": 0, "context": context}


@pytest.fixture
def launched(platform_env: Database, tiny_model: Path) -> Iterator[dict[str, Any]]:
    out = launch_replica(deploy_job(platform_env, tiny_model, "tiny"))
    yield out
    if signal_alive(out["pid"]):
        os.kill(out["pid"], 9)
        wait_gone(out["pid"], 10)


def test_the_instance_gets_the_address_the_daemon_reported(
    platform_env: Database, launched: dict[str, Any]
) -> None:
    with platform_env.transaction() as s:
        row = s.get(Instance, launched["instance_id"])
        assert row is not None
        assert (row.address, row.pid) == (launched["address"], launched["pid"])
    assert launched["address"].startswith("http://127.0.0.1:")
    assert not launched["address"].endswith(":0")
    upstream = {"launch_replica_0": launched}
    healthy = health_check({"replica": 0, "context": {"upstream": upstream}})
    assert healthy["health"]["running"] == 0
    assert stop_instance({"instance_id": launched["instance_id"]})["state"] == "stopped"
    assert wait_gone(launched["pid"], 20)


def test_a_daemon_that_dies_before_ready_fails_the_launch_with_its_reason(
    platform_env: Database, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    args = deploy_job(platform_env, broken, "broken")
    with pytest.raises(OperatorFailed) as failed:
        launch_replica(args)
    assert "the engine daemon exited with status 1 before it was ready" in str(failed.value)
    assert "flowserve: error:" in str(failed.value)
    with platform_env.transaction() as s:
        (row,) = s.query(Instance).filter_by(deployment_id=args["deployment_id"]).all()
        assert row.state is InstanceState.FAILED and row.address is None

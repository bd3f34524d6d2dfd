"""Failover on real processes: a stuck instance's daemon is ended (its process group gone, its
port free) before its replacement starts, and an instance whose launch attempt was lost
(killed, or frozen past its lease) neither stands in for a replica nor leaves its daemon
behind."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from deepflow.procutil import signal_alive
from tests.integration.conftest import Platform
from tests.replicas.conftest import (
    RECOVERY_S,
    deployment,
    group_members,
    port_free,
    wait_deployment,
)

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deepflow.engine.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "tiny", "llama", "tiny")


@pytest.fixture
def deploy(serving: Platform, folder: Path) -> Iterator[Any]:
    """``deploy(name, replicas)``: a ready deployment of the tiny model under ``name``;
    deleted (its daemons stopped) after the test."""
    from deepflow.store import (
        ModelVersionState,
        ensure_tenant,
        register_model_version,
        set_model_version_state,
    )

    made: list[str] = []

    def make(name: str, replicas: int) -> dict[str, Any]:
        with serving.db.transaction() as s:
            version = register_model_version(s, ensure_tenant(s, "acme").id, name, str(folder))
            set_model_version_state(s, version.id, ModelVersionState.READY)
        body = {"model": name, "replicas": replicas, "engine_args": {"max_num_seqs": 4}}
        r = serving.call("POST", "/v1/deployments", body)
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
        return wait_deployment(serving, made[-1], "ready", ready=replicas)

    yield make
    for deployment_id in made:
        pids = {i["pid"] for i in deployment(serving, deployment_id)["instances"] if i["pid"]}
        serving.call("DELETE", f"/v1/deployments/{deployment_id}")
        wait_deployment(serving, deployment_id, "deleted")
        for pid in pids & set(_daemons()):  # what a failed test left running
            os.killpg(pid, signal.SIGKILL)


def test_a_stuck_daemon_is_ended_before_its_replacement_starts(
    serving: Platform, deploy: Any
) -> None:
    d = deploy("stuck", 1)
    (victim,) = d["instances"]
    pid, port = victim["pid"], urlsplit(victim["address"]).port
    assert port is not None and group_members(pid) == [pid]
    os.kill(pid, signal.SIGSTOP)  # alive and listening, answering nothing
    try:
        deadline = time.monotonic() + RECOVERY_S
        while not (newer := _others(deployment(serving, d["id"]), victim["id"])):
            assert time.monotonic() < deadline, "no replacement was launched"
            time.sleep(0.1)
        # the replacement's row exists, so its launch has begun: the stuck daemon is gone
        assert not signal_alive(pid), "the stuck daemon runs next to its replacement"
        left = max(0.0, deadline - time.monotonic())
        after = wait_deployment(serving, d["id"], "ready", ready=1, timeout_s=left)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    states = {i["id"]: i["state"] for i in after["instances"]}
    assert states[victim["id"]] == "failed"
    assert states[newer[0]["id"]] == "ready"
    assert group_members(pid) == []
    assert port_free(port)


@pytest.mark.parametrize("lost", ["attempt killed", "worker frozen past its lease"])
def test_an_instance_whose_launch_was_lost_neither_counts_nor_lingers(
    serving: Platform, deploy: Any, lost: str
) -> None:
    """The attempt running ``launch_replica`` is lost while its daemon starts: SIGKILLed (a
    worker killed, an attempt stopped past its grace), or its worker frozen until the
    reconciler has given its lease away and the attempt has recorded its daemon's address.
    The task's retry launches another instance. The first one, which no health check will
    ever mark ready, must be failed and its daemon ended; counted as live, it kept the
    deployment a replica short, or made the retry's healthy instance look surplus (stopped)."""
    d = deploy("relaunched-" + lost.split()[1], 1)
    known = {i["pid"] for i in d["instances"]}
    r = serving.call("PATCH", f"/v1/deployments/{d['id']}", {"replicas": 2})
    assert r.status_code == 200, r.text
    daemon = _new_daemon(d["model"], known, timeout_s=60)
    attempt = _parent(daemon)
    with open(f"/proc/{attempt}/cmdline", "rb") as f:
        assert b"deepflow.cli\0worker" in f.read()  # a fork of a Celery pool process
    if lost == "attempt killed":
        os.kill(attempt, signal.SIGKILL)
        orphan = _first_new_instance(serving, d, timeout_s=30)
    else:
        pool = _parent(attempt)
        os.kill(pool, signal.SIGSTOP)
        try:
            orphan = _first_new_instance(serving, d, timeout_s=30)
            deadline = time.monotonic() + 60
            while _attempt(serving, d["id"]) < 2 or _unrecorded(serving, d["id"], orphan):
                assert time.monotonic() < deadline, "the frozen worker's launch did not go on"
                time.sleep(0.1)
        finally:
            os.kill(pool, signal.SIGCONT)

    deadline = time.monotonic() + RECOVERY_S
    while _instance(serving, d["id"], orphan)["state"] == "starting":
        assert time.monotonic() < deadline, (
            f"the lost launch's instance still counts as live: {deployment(serving, d['id'])}"
        )
        time.sleep(0.2)
    after = wait_deployment(serving, d["id"], "ready", ready=2, timeout_s=RECOVERY_S)
    states = {i["id"]: i["state"] for i in after["instances"]}
    assert states[orphan] == "failed" and "starting" not in states.values(), states
    job = serving.wait(after["job_id"])
    launch = next(t for t in job["tasks"] if t["name"] == "launch_replica_0")
    assert launch["state"] == "succeeded" and launch["attempt"] == 2, launch
    time.sleep(3)  # several supervisor passes: nothing is taken for surplus and stopped
    again = deployment(serving, d["id"])
    assert [i["state"] for i in again["instances"]].count("ready") == 2, again
    assert not signal_alive(daemon) and group_members(daemon) == []


def _others(d: dict[str, Any], instance_id: str) -> list[dict[str, Any]]:
    return [i for i in d["instances"] if i["id"] != instance_id]


def _daemons(name: str = "") -> list[int]:
    """The engine daemons running here (serving ``name``, if given)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # not a process, or gone
            continue
        if b"deepflow.engine.daemon" in cmdline and f"\0{name}".encode() in cmdline:
            found.append(int(entry))
    return found


def _new_daemon(name: str, known: set[int], timeout_s: float) -> int:
    """The pid of a daemon of ``name`` not among ``known``, as soon as it runs."""
    deadline = time.monotonic() + timeout_s
    while not (new := set(_daemons(f"{name}\0")) - known):
        assert time.monotonic() < deadline, "no new daemon started"
        time.sleep(0.02)
    (pid,) = new
    return pid


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def _first_new_instance(serving: Platform, d: dict[str, Any], timeout_s: float) -> str:
    old = {i["id"] for i in d["instances"]}
    deadline = time.monotonic() + timeout_s
    while not (new := [i for i in deployment(serving, d["id"])["instances"] if i["id"] not in old]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return str(new[0]["id"])  # instances come oldest first


def _instance(serving: Platform, deployment_id: str, instance_id: str) -> dict[str, Any]:
    instances = deployment(serving, deployment_id)["instances"]
    return next(i for i in instances if i["id"] == instance_id)  # type: ignore[no-any-return]


def _unrecorded(serving: Platform, deployment_id: str, instance_id: str) -> bool:
    """The instance is starting without an address yet (its launch waits for the report)."""
    instance = _instance(serving, deployment_id, instance_id)
    return instance["state"] == "starting" and not instance["address"]


def _attempt(serving: Platform, deployment_id: str) -> int:
    """The attempt the first launch of the deployment's deploy job is at."""
    tasks = serving.job(deployment(serving, deployment_id)["job_id"])["tasks"]
    return int(next(t["attempt"] for t in tasks if t["name"] == "launch_replica_0"))

"""Deployments converge on their replica count through ``serve`` jobs.

The deployment row holds what users asked for; instances are what runs. ``converge`` compares
the two and, when they differ and no deploy job of the deployment is still running, creates
one that launches the missing replicas or stops the surplus. The API calls it on create,
scale and delete; the supervisor (``deepflow.replicas.supervisor``) calls it after an
instance dies. ``settle`` moves the deployment's own state once a job has done its part.

A starting instance counts as live only while the deploy job that launched it runs: that
job's health check is the only way to ready, so once the job has ended the instance never
gets there (its launch attempt was killed, or lost its lease while a retry launched another,
or its health check gave up). ``converge`` fails such instances and ends their daemons before
it counts; counted as live, one stood in for a replacement forever (the deployment stayed
degraded) or made a later replacement look surplus, so that the healthy one was stopped.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from sqlalchemy.orm import Session

from deepflow import dag
from deepflow.dispatch import Dispatcher
from deepflow.replicas.daemons import end_daemon
from deepflow.store import (
    Database,
    Deployment,
    DeploymentState,
    Instance,
    InstanceState,
    Job,
    create_job,
    deployment_instances,
    report_instance_load,
    set_deployment_state,
)
from deepflow.store.deployments import GONE
from deepflow.store.transitions import lock, set_instance_state

DRAIN_TIMEOUT_S = 60.0

__all__ = ["GONE", "converge", "drain", "record_load", "settle"]


def _desired(deployment: Deployment) -> int:
    return 0 if deployment.state in GONE else deployment.replicas


def _give_up_orphans(
    session: Session, deployment: Deployment
) -> list[tuple[str, str | None, int | None]]:
    """Fail the deployment's starting instances whose deploy job has ended (see the module's
    docstring); returns (id, host, pid) of each, whose daemon may still run."""
    orphans = []
    for instance in deployment_instances(session, deployment.id, live_only=True):
        if instance.state is not InstanceState.STARTING:
            continue
        job = session.get(Job, instance.job_id) if instance.job_id else None
        if job is not None and not job.state.is_terminal:
            continue
        instance = lock(session, Instance, instance.id)
        if instance.state is InstanceState.STARTING:
            reason = "its deploy job ended before it was ready"
            set_instance_state(session, instance, InstanceState.FAILED, reason=reason)
            orphans.append((instance.id, instance.host, instance.pid))
    return orphans


def _outdated(deployment: Deployment, instance: Instance) -> bool:
    """Serving other weights than the deployment's now (it was moved to a new version)."""
    return instance.model_path is not None and instance.model_path != deployment.model_path


def _change_needed(session: Session, deployment: Deployment) -> dict[str, Any] | None:
    """The deploy job spec that closes the gap between asked-for and live, or None.
    Outdated instances are replaced: new ones launched first, the old stopped once those are
    healthy, so the deployment serves throughout."""
    live = deployment_instances(session, deployment.id, live_only=True)
    old = [i.id for i in live if _outdated(deployment, i)]
    live = [i for i in live if not _outdated(deployment, i)]
    desired = _desired(deployment)
    if old:
        if len(live) < desired:
            return {"deployment_id": deployment.id, "launch": desired - len(live), "replace": old}
        return {"deployment_id": deployment.id, "stop": old}
    if len(live) < desired:
        return {"deployment_id": deployment.id, "launch": desired - len(live)}
    if len(live) > desired:
        newest_first = sorted(live, key=lambda i: i.created_at, reverse=True)
        surplus = newest_first[: len(live) - desired]
        return {"deployment_id": deployment.id, "stop": [i.id for i in surplus]}
    return None


def converge(
    db: Database, dispatcher: Dispatcher | None, deployment_id: str, reason: str
) -> str | None:
    """Start a deploy job for the deployment if it needs one and none is running; returns the
    new job's id. Instances given up on the way have their daemons ended first, so what they
    hold (a port, device memory) is free before a replacement starts."""
    with db.transaction() as session:
        deployment = lock(session, Deployment, deployment_id)
        if deployment.job_id is not None:
            current = session.get(Job, deployment.job_id)
            if current is not None and not current.state.is_terminal:
                return None  # that job's last task settles the deployment; we look again then
        orphans = _give_up_orphans(session, deployment)
        job_id = None if orphans else _start_job(session, deployment, reason)
    if orphans:
        for orphan in orphans:
            end_daemon(*orphan)
        return converge(db, dispatcher, deployment_id, reason)  # they no longer count
    if job_id is not None and dispatcher is not None:
        dispatcher.try_dispatch(job_id, "deploy")
    return job_id


def _start_job(session: Session, deployment: Deployment, reason: str) -> str | None:
    spec = _change_needed(session, deployment)
    if spec is None:
        if deployment.state is DeploymentState.DELETING:
            set_deployment_state(session, deployment, DeploymentState.DELETED)
        return None
    spec["resource_class"] = deployment.resource_class.value
    spec["reason"] = reason
    job, _ = create_job(session, deployment.tenant_id, dag.plan("deploy", spec), "deploy", None)
    deployment.job_id = job.id
    return job.id


def settle(session: Session, deployment_id: str) -> dict[str, Any]:
    """Move the deployment's state to match its instances (the deploy job's last task)."""
    deployment = lock(session, Deployment, deployment_id)
    instances = deployment_instances(session, deployment_id, live_only=True)
    ready = sum(i.state is InstanceState.READY for i in instances)
    state, desired = deployment.state, _desired(deployment)
    if state is DeploymentState.DELETING and not instances:
        set_deployment_state(session, deployment, DeploymentState.DELETED)
    elif state not in GONE and desired and ready >= desired and state is not DeploymentState.READY:
        set_deployment_state(session, deployment, DeploymentState.READY)
    elif state is DeploymentState.READY and ready < desired:
        set_deployment_state(session, deployment, DeploymentState.DEGRADED, reason="too few ready")
    elif state is DeploymentState.CREATING and ready == 0:
        set_deployment_state(
            session, deployment, DeploymentState.FAILED, reason="no instance came up"
        )
    return {
        "deployment_id": deployment_id,
        "state": str(deployment.state),
        "ready": ready,
        "replicas": deployment.replicas,
    }


def record_load(session: Session, instance_id: str, health: dict[str, Any]) -> None:
    """A /health answer as the instance's heartbeat and load."""
    report_instance_load(
        session,
        instance_id,
        running=int(health.get("running", 0)),
        waiting=int(health.get("waiting", 0)),
        kv_cache_usage=float(health.get("kv_cache_usage", 0.0)),
    )


def drain(address: str, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Ask a daemon to drain and wait until it has exited (stops answering)."""
    try:
        httpx.post(f"{address}/drain", timeout=5)
    except httpx.HTTPError:
        return  # already gone
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{address}/health", timeout=2)
        except httpx.HTTPError:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} still answers {timeout_s:.0f}s after /drain")

"""The ``deploy`` job kind's operators: bring engine daemons up, check them, stop them.

``launch_replica`` runs on a worker of the deployment's resource class, so the daemon it
starts inherits that worker's pinned device; the daemon runs in its own session and outlives
the task (it is long-lived by design). It learns the daemon's address from the daemon's
ready report (``spawn``). Everything else talks HTTP and runs on ``cpu``.

A plugin of the operator registry: ``OPERATORS`` is what our pyproject's
``deepflow.operators`` entry point (``deploy``) hands it. Importing registers nothing.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from deepflow.config import Settings
from deepflow.dag.operators import Operator, OperatorFailed
from deepflow.devices import pinned_device
from deepflow.gateway.table import REFRESH_S
from deepflow.procutil import wait_gone
from deepflow.replicas import converge
from deepflow.replicas.daemons import daemon_env, end_daemon
from deepflow.replicas.spawn import DaemonFailed, spawn_daemon
from deepflow.store import (
    Database,
    Deployment,
    Instance,
    InstanceState,
    create_instance,
    get_database,
    set_instance_state,
)
from deepflow.store.transitions import lock
from deepflow.store.types import utcnow

LAUNCH_TIMEOUT_S = 300.0
HEALTH_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 15.0
"""After a drained daemon stops answering, how long it gets to exit before SIGKILL."""
ROUTES_SETTLE_S = 2 * REFRESH_S
"""Two refreshes of the gateways' routing tables (``gateway.table.REFRESH_S``)."""


def _db() -> Database:
    return get_database(Settings.from_env().database_url)


def _deployment(deployment_id: str) -> Deployment:
    with _db().transaction() as session:
        deployment = session.get(Deployment, deployment_id)
        if deployment is None:
            raise OperatorFailed(f"deployment {deployment_id} does not exist")
        session.expunge(deployment)
        return deployment


def prepare_weights(args: dict[str, Any]) -> dict[str, Any]:
    """Check the model folder and read its files once, so the daemons load from page cache."""
    folder = Path(_deployment(args["deployment_id"]).model_path)
    if not (folder / "config.json").is_file():
        raise OperatorFailed(f"{folder} is not a model folder (no config.json)")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise OperatorFailed(f"{folder} holds no *.safetensors weights")
    total = 0
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return {"model_path": str(folder), "weight_files": len(weights), "bytes": total}


def _engine_argv(deployment: Deployment, host: str) -> list[str]:
    argv = [sys.executable, "-m", "deepflow.engine.daemon", deployment.model_path]
    argv += ["--host", host, "--port", "0", "--served-model-name", deployment.name]
    for key, value in sorted(deployment.engine_args.items()):
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def launch_replica(args: dict[str, Any]) -> dict[str, Any]:
    """Start one daemon; return once it reports ready (its address) or fail with its exit
    status and its log's tail."""
    settings = Settings.from_env()
    context = args["context"]
    deployment = _deployment(args["deployment_id"])
    if deployment.state in converge.GONE:
        raise OperatorFailed(f"deployment {deployment.id} is {deployment.state}")
    db = _db()
    with db.transaction() as session:
        instance = create_instance(
            session,
            deployment.tenant_id,
            model_name=deployment.name,
            device=pinned_device(deployment.resource_class.value),
            job_id=context["job_id"],
            deployment_id=deployment.id,
            host=socket.gethostname(),
            start_path="cold",
            model_path=deployment.model_path,
        )
        instance_id = instance.id
    log_path = settings.ensure_home() / "instances" / f"{instance_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = _engine_argv(deployment, settings.instance_host)
    try:
        spawned = spawn_daemon(
            argv,
            log_path,
            timeout_s=LAUNCH_TIMEOUT_S,
            env=daemon_env(instance_id),
            detach=True,
            on_start=lambda pid: _record(db, instance_id, pid=pid),
        )
    except DaemonFailed as exc:
        _launch_failed(db, instance_id, exc)
        raise OperatorFailed(str(exc)) from None
    except BaseException as exc:  # stopped, or given up (_record): spawn killed the daemon
        _launch_failed(db, instance_id, exc)
        raise
    # The worker process stays the daemon's parent: reap it when it exits, or it lingers
    # as a zombie (still "alive" to kill(pid, 0)).
    proc, ready = spawned.proc, spawned.ready
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    try:
        _record(db, instance_id, pid=ready.pid, address=ready.url)
    except BaseException as exc:  # stopped, or given up meanwhile: nobody else would end it
        end_daemon(instance_id, socket.gethostname(), proc.pid)
        _launch_failed(db, instance_id, exc)
        raise
    return {"instance_id": instance_id, "address": ready.url, "pid": ready.pid}


def _record(db: Database, instance_id: str, *, pid: int, address: str | None = None) -> None:
    """Write the daemon's pid (as soon as it runs, so a launch killed before the report leaves
    a daemon that can still be found) and then its address. Refused once the instance is no
    longer starting: its deploy job ended and ``converge`` gave it up."""
    with db.transaction() as session:
        row = lock(session, Instance, instance_id)
        if row.state is not InstanceState.STARTING:
            raise OperatorFailed(f"instance {instance_id} is {row.state}: its launch was given up")
        row.pid, row.updated_at = pid, utcnow()
        row.address = address or row.address


def _launch_failed(db: Database, instance_id: str, exc: BaseException) -> None:
    with db.transaction() as session:
        if lock(session, Instance, instance_id).state is InstanceState.STARTING:
            set_instance_state(
                session, instance_id, InstanceState.FAILED, reason=f"launch failed: {exc}"
            )


def health_check(args: dict[str, Any]) -> dict[str, Any]:
    """From the platform's side: the launched instance answers /health; mark it ready."""
    launched = args["context"]["upstream"][f"launch_replica_{args['replica']}"]
    instance_id, address = launched["instance_id"], launched["address"]
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{address}/health", timeout=5)
            if r.status_code == 200:
                load = r.json()
                with _db().transaction() as session:
                    instance = session.get(Instance, instance_id)
                    if instance is None or instance.state is not InstanceState.READY:
                        # (a retried check finds it ready when its first attempt got this far)
                        set_instance_state(session, instance_id, InstanceState.READY)
                    converge.record_load(session, instance_id, load)
                return {"instance_id": instance_id, "address": address, "health": load}
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise OperatorFailed(f"instance {instance_id} at {address} is not healthy: {last}")


def stop_instance(args: dict[str, Any]) -> dict[str, Any]:
    """Drain the instance (it finishes open requests, then exits) and mark it stopped."""
    instance_id = args["instance_id"]
    with _db().transaction() as session:
        instance = session.get(Instance, instance_id)
        if instance is None:
            raise OperatorFailed(f"instance {instance_id} does not exist")
        address, state, host, pid = instance.address, instance.state, instance.host, instance.pid
        if state is InstanceState.READY:
            set_instance_state(session, instance_id, InstanceState.DRAINING)
    if state in (InstanceState.STOPPED, InstanceState.FAILED):
        return {"instance_id": instance_id, "state": str(state)}
    if state is InstanceState.READY:
        # Every gateway re-reads its routes within ROUTES_SETTLE_S: by then none sends new
        # requests here, and each knows the replicas that replace this one (a rolling update
        # readied them just now), so a request that still meets the drain is retried there.
        time.sleep(ROUTES_SETTLE_S)
    if address:
        converge.drain(address)
    if pid and host == socket.gethostname() and not wait_gone(pid, EXIT_TIMEOUT_S):
        end_daemon(instance_id, host, pid)
    with _db().transaction() as session:
        set_instance_state(session, instance_id, InstanceState.STOPPED, reason="scaled in")
    return {"instance_id": instance_id, "state": "stopped"}


def update_deployment(args: dict[str, Any]) -> dict[str, Any]:
    """After the job's launches and stops: the deployment's state from what is live. Fails
    (so the job fails) when fewer replicas are ready than the deployment asks for."""
    with _db().transaction() as session:
        settled = converge.settle(session, args["deployment_id"])
    gone = settled["state"] in (str(s) for s in converge.GONE)
    if not gone and settled["ready"] < settled["replicas"]:
        raise OperatorFailed(
            f"{settled['ready']} of {settled['replicas']} replicas are ready "
            f"(deployment {settled['state']})"
        )
    return settled


OPERATORS = tuple(
    Operator(name, run, description=run.__doc__ or "", takes_context=context, internal=True)
    for name, run, context in (
        ("deploy.prepare_weights", prepare_weights, False),
        ("deploy.launch_replica", launch_replica, True),
        ("deploy.health_check", health_check, True),
        ("deploy.stop_instance", stop_instance, False),
        ("deploy.update_deployment", update_deployment, False),
    )
)

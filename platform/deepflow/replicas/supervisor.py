"""The platform's eye on its engine daemons: one pass probes every ready instance's /health
(its heartbeat and load), fails the dead ones, and converges each deployment.

A refused connection means nothing listens any more: the instance is failed at once. A probe
that times out is a miss; ``MISSES_TO_FAIL`` in a row fail it too (a stuck process). A failed
instance's daemon is ended there and then (SIGKILL to its process group, waiting until it is
gone), before the same pass converges its deployment: a stuck daemon would otherwise keep
its port, its memory and its device's memory next to its replacement, and outlive the
platform. The reconciler runs ``pass_once`` every ``reconcile_interval_s``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select

from deepflow.dag import JobState
from deepflow.dispatch import Dispatcher
from deepflow.procutil import signal_alive
from deepflow.replicas.converge import converge, record_load, settle
from deepflow.replicas.daemons import end_daemon, is_daemon_of
from deepflow.store import (
    Database,
    Deployment,
    DeploymentState,
    Instance,
    InstanceState,
    Job,
    set_instance_state,
)
from deepflow.store.transitions import lock
from deepflow.store.types import utcnow

log = logging.getLogger(__name__)

MISSES_TO_FAIL = 3
PROBE_TIMEOUT_S = 2.0
STOPPABLE = (InstanceState.STARTING, InstanceState.READY, InstanceState.DRAINING)
"""What `up` stops on exit (the StopInstance rule's from-states); a failed instance's daemon
that still runs is only killed."""
RETRY_AFTER_FAILED_JOB_S = 30.0
"""A deployment whose last deploy job failed is tried again only after this long; a failed
deployment (nothing ever came up) only when a user scales it."""


@dataclass
class Supervisor:
    db: Database
    dispatcher: Dispatcher | None
    misses: dict[str, int] = field(default_factory=dict)

    def pass_once(self) -> None:
        self.probe_instances()
        self.converge_deployments()

    def probe_instances(self) -> None:
        with self.db.transaction() as session:
            rows = session.execute(
                select(Instance.id, Instance.address).where(
                    Instance.state == InstanceState.READY, Instance.address.is_not(None)
                )
            ).all()
        if not rows:
            return
        with ThreadPoolExecutor(max_workers=min(16, len(rows))) as pool:
            results = list(pool.map(lambda r: (r[0], _probe(r[1])), rows))
        for instance_id, (health, verdict) in results:
            self._apply(instance_id, health, verdict)

    def _apply(self, instance_id: str, health: dict[str, Any] | None, verdict: str) -> None:
        failed = None
        with self.db.transaction() as session:
            if health is not None:
                self.misses.pop(instance_id, None)
                record_load(session, instance_id, health)
                return
            misses = self.misses.get(instance_id, 0) + 1
            self.misses[instance_id] = misses
            if verdict == "refused" or misses >= MISSES_TO_FAIL:
                self.misses.pop(instance_id, None)
                row = session.get(Instance, instance_id)
                if row is not None and row.state is InstanceState.READY:
                    log.warning("instance %s failed its health checks: %s", instance_id, verdict)
                    set_instance_state(
                        session, instance_id, InstanceState.FAILED, reason=f"health: {verdict}"
                    )
                    failed = (row.host, row.pid)
        if failed is not None:
            end_daemon(instance_id, *failed)

    def converge_deployments(self) -> None:
        with self.db.transaction() as session:
            rows = session.execute(
                select(Deployment.id, Job.state, Job.finished_at)
                .outerjoin(Job, Job.id == Deployment.job_id)
                .where(Deployment.state.not_in([DeploymentState.DELETED, DeploymentState.FAILED]))
            ).all()
        backoff = utcnow() - timedelta(seconds=RETRY_AFTER_FAILED_JOB_S)
        for deployment_id, job_state, finished_at in rows:
            if job_state is not None and not job_state.is_terminal:
                continue  # its deploy job settles it when done
            if job_state is JobState.FAILED and finished_at is not None and finished_at > backoff:
                continue
            with self.db.transaction() as session:
                settle(session, deployment_id)
            converge(self.db, self.dispatcher, deployment_id, "supervisor")


def _probe(address: str) -> tuple[dict[str, Any] | None, str]:
    """(health JSON, "ok") or (None, why)."""
    try:
        r = httpx.get(f"{address}/health", timeout=PROBE_TIMEOUT_S)
    except httpx.ConnectError:
        return None, "refused"
    except httpx.HTTPError as exc:
        return None, f"no answer ({type(exc).__name__})"
    if r.status_code != 200:
        return None, f"HTTP {r.status_code}"
    return r.json(), "ok"


def stop_local_instances(db: Database, grace_s: float = 15.0) -> int:
    """Stop the daemons this host runs (``deepflow up`` exiting): SIGTERM drains the live
    ones, and after ``grace_s`` SIGKILL goes to every daemon's process group; daemons of
    failed instances that still run are killed at once. The live ones are marked stopped, so
    the next start brings their deployments back to strength. Returns how many were live."""
    host = socket.gethostname()
    with db.transaction() as session:
        rows = session.execute(
            select(Instance.id, Instance.state, Instance.pid).where(
                Instance.state != InstanceState.STOPPED,
                Instance.host == host,
                Instance.pid.is_not(None),
            )
        ).all()
    live = [instance_id for instance_id, state, _ in rows if state in STOPPABLE]
    running = [(pid, state) for instance_id, state, pid in rows if is_daemon_of(pid, instance_id)]
    for pid, state in running:
        signal_alive(pid, signal.SIGTERM if state in STOPPABLE else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    alive = {pid for pid, _ in running}
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = {pid for pid in alive if signal_alive(pid)}
    for pid, _ in running:  # also what a daemon started and left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    for instance_id in live:
        with db.transaction() as session:
            # A deploy job's stop may have ended it meanwhile (a rolling update's last step).
            if lock(session, Instance, instance_id).state in STOPPABLE:
                set_instance_state(
                    session, instance_id, InstanceState.STOPPED, reason="the platform stopped"
                )
    return len(live)

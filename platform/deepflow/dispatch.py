"""Hands accepted jobs to Prefect: one flow run of the job kind's deployment per job.

The API dispatches each job right after committing it, waiting for it at most
``REQUEST_DISPATCH_S``: a slow or unreachable Prefect (on SQLite it answers 503 while busy, and
its client backs off for up to a minute) must not hold up the request that was accepted. The
creation goes on in the dispatcher's thread and records the flow run when it gets one; should
it fail, the job stays ``pending`` and ``dispatch_pending`` (run by the reconciler loop) tries
again later. Prefect's idempotency key (the job id) makes a retried creation return the same
flow run, so a job never gets two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as WaitTimeout
from contextlib import contextmanager
from datetime import timedelta
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed
from sqlalchemy import select

from deepflow.dag import JobState
from deepflow.store import (
    Database,
    Job,
    attach_flow_run,
    hand_over,
    orphaned_jobs,
    undriven_jobs,
)
from deepflow.store.types import utcnow

log = logging.getLogger(__name__)

DEPLOYMENT = "default"
REQUEST_DISPATCH_S = 10.0
"""The longest a request (``POST /v1/jobs``, a dashboard retry) waits for its flow run."""
SLOW_DISPATCH_S = 2.0


def flow_name(kind: str) -> str:
    return f"deepflow-{kind}"


def deployment_name(kind: str) -> str:
    """The Prefect deployment that runs jobs of ``kind``: ``deepflow-dag/default``."""
    return f"{flow_name(kind)}/{DEPLOYMENT}"


class Dispatcher:
    """Creates flow runs through Prefect's API at ``api_url``."""

    def __init__(self, db: Database, api_url: str) -> None:
        self.db = db
        self.api_url = api_url
        self._deployments: dict[str, UUID] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dispatch")

    @contextmanager
    def _client(self) -> Iterator[SyncPrefectClient]:
        with temporary_settings({PREFECT_API_URL: self.api_url}):
            client = get_client(sync_client=True)
        with client:
            yield client

    def dispatch(self, job_id: str, kind: str) -> str:
        """Create (or find) the job's flow run and record it; returns the flow run id."""
        flow_run_id = self._create_flow_run(job_id, kind, f"deepflow-job:{job_id}")
        with self.db.transaction() as session:
            attach_flow_run(session, job_id, flow_run_id)
        return flow_run_id

    def _create_flow_run(self, job_id: str, kind: str, key: str) -> str:
        """A flow run of the kind's deployment for the job (the one already made with
        ``key``, if any: Prefect's idempotency key)."""
        start = time.monotonic()
        with self._client() as client:
            if kind not in self._deployments:
                deployment = client.read_deployment_by_name(deployment_name(kind))
                self._deployments[kind] = deployment.id
            flow_run = client.create_flow_run_from_deployment(
                self._deployments[kind],
                parameters={"job_id": job_id},
                idempotency_key=key,
                tags=["deepflow", f"kind:{kind}"],
            )
        if (took := time.monotonic() - start) > SLOW_DISPATCH_S:
            log.warning("Prefect took %.1f s to create the flow run of job %s", took, job_id)
        return str(flow_run.id)

    def redrive_orphans(self, silent_s: float) -> list[str]:
        """Hand each job whose driver has been silent for ``silent_s`` (its flow run's process
        died), or whose flow run Prefect ended before it drove the job, to a new flow run, and
        mark the old one crashed in Prefect. Returns their ids."""
        stale_before = utcnow() - timedelta(seconds=silent_s)
        with self.db.transaction() as session:
            orphans = orphaned_jobs(session, stale_before)
            undriven = undriven_jobs(session, stale_before)
        ended = self._ended_runs([o.flow_run_id for o in undriven if o.flow_run_id])
        orphans += [o for o in undriven if o.flow_run_id in ended]
        redriven = []
        for orphan in orphans:
            # Keyed by the silent run: a repeat finds the same new run, and should that one
            # die before it starts driving, the next hand-over (after it) makes another.
            key = f"deepflow-job:{orphan.job_id}:after:{orphan.flow_run_id}"
            try:
                flow_run_id = self._create_flow_run(orphan.job_id, orphan.kind, key)
            except Exception as exc:  # Prefect down: the next pass tries again
                log.warning("could not redrive job %s yet: %r", orphan.job_id, exc)
                continue
            with self.db.transaction() as session:
                if not hand_over(session, orphan, flow_run_id, stale_before):
                    continue
            log.warning(
                "job %s: its driver (flow run %s) went silent; flow run %s drives it now",
                orphan.job_id,
                orphan.flow_run_id,
                flow_run_id,
            )
            redriven.append(orphan.job_id)
            if orphan.flow_run_id is not None:
                self._mark_crashed(orphan.flow_run_id, flow_run_id)
        return redriven

    def _ended_runs(self, flow_run_ids: list[str]) -> set[str]:
        """Those of the flow runs that Prefect ended (a worker that could not start one
        crashes it), in one request."""
        if not flow_run_ids:
            return set()
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in flow_run_ids]))
        try:
            with self._client() as client:
                found = client.read_flow_runs(flow_run_filter=runs, limit=len(flow_run_ids))
        except Exception as exc:  # Prefect down: the next pass asks again
            log.warning("could not read %d flow runs: %r", len(flow_run_ids), exc)
            return set()
        return {str(r.id) for r in found if r.state is not None and r.state.is_final()}

    def _mark_crashed(self, flow_run_id: str, successor: str) -> None:
        """Show a dead driver's flow run as Crashed in Prefect (it cannot say so itself)."""
        message = f"its process stopped driving the job; flow run {successor} took it over"
        try:
            with self._client() as client:
                client.set_flow_run_state(UUID(flow_run_id), Crashed(message=message), force=True)
        except Exception as exc:  # only what Prefect's UI shows depends on it
            log.warning("could not mark flow run %s crashed: %r", flow_run_id, exc)

    def try_dispatch(
        self, job_id: str, kind: str, wait_s: float | None = REQUEST_DISPATCH_S
    ) -> str | None:
        """``dispatch``, or None when it failed or (``wait_s``) is still going: a creation
        still going records its flow run when it ends, and the reconciler's
        ``dispatch_pending`` retries one that failed."""
        try:
            if wait_s is None:
                return self.dispatch(job_id, kind)
            return self._pool.submit(self.dispatch, job_id, kind).result(timeout=wait_s)
        except WaitTimeout:
            log.warning(
                "job %s: Prefect is slow; its flow run is created in the background", job_id
            )
        except Exception as exc:  # Prefect down: the job waits, pending, for the next pass
            log.warning("could not dispatch job %s yet: %r", job_id, exc)
        return None

    def dispatch_pending(self, older_than_s: float = 5.0) -> list[str]:
        """Dispatch jobs still pending without a flow run (their first dispatch failed)."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self.db.transaction() as session:
            rows = session.execute(
                select(Job.id, Job.kind).where(
                    Job.state == JobState.PENDING,
                    Job.flow_run_id.is_(None),
                    Job.created_at < cutoff,
                )
            ).all()
        return [job_id for job_id, kind in rows if self.try_dispatch(job_id, kind, wait_s=None)]

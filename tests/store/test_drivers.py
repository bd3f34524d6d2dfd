"""A job's driver: the newest holds the job, a silent one is found and its job handed over."""

from __future__ import annotations

from datetime import timedelta

import pytest

from deepflow import dag
from deepflow.store import (
    Database,
    DriverSuperseded,
    attach_flow_run,
    claim_driver,
    create_job,
    drive_job,
    ensure_tenant,
    hand_over,
    job_dag,
    orphaned_jobs,
    undriven_jobs,
)
from deepflow.store.types import utcnow

SPEC = {"tasks": [{"name": "a", "operator": "noop"}, {"name": "b", "operator": "noop"}]}


def _started_job(db: Database) -> tuple[str, int]:
    """A job whose first flow run has started driving it: (job id, driver number)."""
    with db.transaction() as s:
        tenant = ensure_tenant(s, "acme")
        job, _ = create_job(s, tenant.id, dag.plan("dag", SPEC), "dag", None)
        attach_flow_run(s, job.id, "run-1")
        return job.id, claim_driver(s, job.id)


def test_a_newer_driver_takes_the_job_and_the_older_stops(db: Database) -> None:
    job_id, first = _started_job(db)
    with db.transaction() as s:
        the_dag = job_dag(s, job_id)[0]
        assert len(drive_job(s, job_id, the_dag, driver=first).queued) == 2
        attach_flow_run(s, job_id, "run-2")  # handed over: the new run takes over, no Conflict
        second = claim_driver(s, job_id)
        assert second == first + 1
        drive_job(s, job_id, the_dag, driver=second)
    with db.transaction() as s, pytest.raises(DriverSuperseded, match="run-2"):
        drive_job(s, job_id, the_dag, driver=first)


def test_only_a_silent_driver_is_an_orphan_and_it_is_handed_over_once(db: Database) -> None:
    job_id, driver = _started_job(db)
    with db.transaction() as s:
        drive_job(s, job_id, job_dag(s, job_id)[0], driver=driver)  # it passes now
        assert orphaned_jobs(s, utcnow() - timedelta(seconds=30)) == []
        later = utcnow() + timedelta(seconds=60)  # as seen a minute on, it is silent
        (orphan,) = orphaned_jobs(s, later)
        assert (orphan.job_id, orphan.flow_run_id, orphan.driver) == (job_id, "run-1", driver)
        assert hand_over(s, orphan, "run-2", later)
        # its silence restarts at the hand-over: not handed over again before run-2 starts
        assert orphaned_jobs(s, utcnow() - timedelta(seconds=1)) == []
        assert not hand_over(s, orphan, "run-3", utcnow() - timedelta(seconds=1))


def test_a_job_whose_flow_run_never_started_is_no_orphan(db: Database) -> None:
    with db.transaction() as s:
        tenant = ensure_tenant(s, "acme")
        job, _ = create_job(s, tenant.id, dag.plan("dag", SPEC), "dag", None)
        attach_flow_run(s, job.id, "run-1")  # Prefect holds the run; its worker is down
        assert orphaned_jobs(s, utcnow() + timedelta(days=1)) == []


def test_a_job_whose_flow_run_never_drove_it_is_asked_about_once_old(db: Database) -> None:
    """Prefect may end a run it never started (a worker that failed to submit it): such a
    job is listed for the dispatcher to ask Prefect, and can be handed over."""
    with db.transaction() as s:
        tenant = ensure_tenant(s, "acme")
        job, _ = create_job(s, tenant.id, dag.plan("dag", SPEC), "dag", None)
        attach_flow_run(s, job.id, "run-1")
        assert undriven_jobs(s, utcnow() - timedelta(seconds=60)) == []  # too young to ask
        later = utcnow() + timedelta(seconds=60)
        (orphan,) = undriven_jobs(s, later)
        assert (orphan.job_id, orphan.flow_run_id, orphan.driver) == (job.id, "run-1", 0)
        assert hand_over(s, orphan, "run-2", later)
        assert undriven_jobs(s, later) == []  # run-2 holds it now (seen at the hand-over)

"""Task attempts, leases and the reconciler: no lost work, no double runs."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from deepflow import dag
from deepflow.dag import JobState, TaskState
from deepflow.store import (
    Database,
    LeaseLost,
    Reconciler,
    Task,
    advance_job,
    cancel_job,
    claim_task,
    create_job,
    ensure_tenant,
    expire_leases,
    fail_task,
    heartbeat_task,
    queue_task,
    read_job,
    succeed_task,
)
from deepflow.store.leases import DEADLINE_GRACE_S
from deepflow.store.types import utcnow


def _job(db: Database, retries: int = 2, timeout_s: float = 3600.0) -> tuple[str, str, str]:
    spec = {
        "tasks": [
            {
                "name": "work",
                "operator": "noop",
                "retries": retries,
                "retry_delay_s": 10,
                "retry_backoff": 3,
                "max_retry_delay_s": 60,
                "timeout_s": timeout_s,
            },
            {"name": "after", "operator": "noop", "depends_on": ["work"]},
        ]
    }
    with db.transaction() as s:
        tenant = ensure_tenant(s, "acme")
        job, _ = create_job(s, tenant.id, dag.plan("dag", spec), "dag")
        return tenant.id, job.id, job.tasks[0].id


def _task(db: Database, task_id: str) -> Task:
    with db.transaction() as s:
        task = s.get(Task, task_id)
        assert task is not None
        return task


def _start(db: Database, task_id: str, worker: str = "w1", ttl: float = 30) -> int:
    with db.transaction() as s:
        attempt = queue_task(s, task_id).attempt
        assert claim_task(s, task_id, worker, attempt, ttl) is not None
    return attempt


def test_claim_is_fenced_by_attempt_and_state(db: Database) -> None:
    _, _, task_id = _job(db)
    with db.transaction() as s:
        attempt = queue_task(s, task_id).attempt
    assert attempt == 1
    with db.transaction() as s:
        assert claim_task(s, task_id, "w1", attempt + 1, 30) is None  # not this attempt
        assert claim_task(s, task_id, "w1", attempt, 30) is not None
    with db.transaction() as s:
        assert claim_task(s, task_id, "w2", attempt, 30) is None  # a redelivered duplicate
    task = _task(db, task_id)
    assert (task.state, task.lease_owner) == (TaskState.RUNNING, "w1")


def test_only_the_lease_holder_reports(db: Database) -> None:
    _, _, task_id = _job(db)
    attempt = _start(db, task_id)
    with pytest.raises(LeaseLost), db.transaction() as s:
        succeed_task(s, task_id, "w2", attempt, "stolen")
    with pytest.raises(LeaseLost), db.transaction() as s:
        heartbeat_task(s, task_id, "w1", attempt + 1, 30)
    with db.transaction() as s:
        before = _task(db, task_id).lease_expires_at
        assert heartbeat_task(s, task_id, "w1", attempt, 300) > before  # type: ignore[operator]
        succeed_task(s, task_id, "w1", attempt, {"ok": True})
    assert _task(db, task_id).output == {"ok": True}


def test_failures_retry_with_exponential_backoff_then_fail(db: Database) -> None:
    tenant, job_id, task_id = _job(db, retries=2)
    delays = []
    for expected in (TaskState.UP_FOR_RETRY, TaskState.UP_FOR_RETRY, TaskState.FAILED):
        attempt = _start(db, task_id)
        now = utcnow()
        with db.transaction() as s:
            task = fail_task(s, task_id, "w1", attempt, f"boom {attempt}", now)
            assert task.state is expected
            if task.next_attempt_at:
                delays.append((task.next_attempt_at - now).total_seconds())
                assert advance_job(s, job_id, now).ready == []  # backoff not over yet
                assert advance_job(s, job_id, task.next_attempt_at).ready == ["work"]
    assert delays == pytest.approx([10, 30])
    with db.transaction() as s:
        assert advance_job(s, job_id).job_state is JobState.FAILED
    with db.transaction() as s:
        job = read_job(s, tenant, job_id)
        assert job.state is JobState.FAILED and "work" in (job.error or "")
        assert [t.state for t in job.tasks] == [TaskState.FAILED, TaskState.UPSTREAM_FAILED]
        assert job.tasks[0].attempt == 3 and job.tasks[0].error == "boom 3"


def test_backoff_is_capped() -> None:
    from deepflow.store.tasks import retry_delay_s

    task = Task(retry_delay_s=10, retry_backoff=3, max_retry_delay_s=60, attempt=5)
    assert retry_delay_s(task) == 60


def test_expired_lease_is_requeued_then_failed_after_last_attempt(db: Database) -> None:
    tenant, job_id, task_id = _job(db, retries=1)
    _start(db, task_id, ttl=5)
    assert expire_leases(db, utcnow()) == []  # still within its lease
    later = utcnow() + timedelta(seconds=6)
    assert expire_leases(db, later) == [task_id]
    task = _task(db, task_id)
    assert task.state is TaskState.UP_FOR_RETRY and "lease expired" in (task.error or "")
    assert task.lease_owner is None
    # the dead worker's late report is refused: its attempt is over
    with pytest.raises(LeaseLost), db.transaction() as s:
        succeed_task(s, task_id, "w1", 1, "late")
    _start(db, task_id, worker="w2", ttl=5)
    assert expire_leases(db, utcnow() + timedelta(seconds=6)) == [task_id]
    with db.transaction() as s:
        job = read_job(s, tenant, job_id)
        assert job.state is JobState.FAILED  # the reconciler advanced the job too
        assert [t.state for t in job.tasks] == [TaskState.FAILED, TaskState.UPSTREAM_FAILED]


def test_deadline_passes_even_while_heartbeating(db: Database) -> None:
    """A dead worker's overdue attempt ends DEADLINE_GRACE_S after its deadline (a live one
    stops and reports it first); not before."""
    _, _, task_id = _job(db, retries=0, timeout_s=2)
    _start(db, task_id, ttl=3600)
    assert expire_leases(db, utcnow() + timedelta(seconds=3)) == []
    assert expire_leases(db, utcnow() + timedelta(seconds=3 + DEADLINE_GRACE_S)) == [task_id]
    task = _task(db, task_id)
    assert task.state is TaskState.FAILED and task.error == "timed out after 2s"


def test_reconciler_ignores_cancelled_and_finished_tasks(db: Database) -> None:
    tenant, job_id, task_id = _job(db)
    _start(db, task_id, ttl=1)
    with db.transaction() as s:
        cancel_job(s, tenant, job_id)
    assert expire_leases(db, utcnow() + timedelta(seconds=5)) == []


def test_reconciler_thread_expires_leases(db: Database) -> None:
    _, _, task_id = _job(db)
    _start(db, task_id, ttl=0.2)
    reconciler = Reconciler(db, interval_s=0.1)
    reconciler.start()
    try:
        assert reconciler.healthy
        for _ in range(100):
            if _task(db, task_id).state is TaskState.UP_FOR_RETRY:
                break
            time.sleep(0.05)
        assert _task(db, task_id).state is TaskState.UP_FOR_RETRY
    finally:
        reconciler.stop()
    assert not reconciler.healthy

"""Task logs as workers write them: one row per attempt, the first write kept."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from deepflow import dag
from deepflow.store import Database, Task, create_job, ensure_tenant, get_database
from deepflow.store.logs import read_task_logs, write_task_log
from deepflow.store.orm import TaskLog
from deepflow.store.types import utcnow


def _task(db: Database) -> Task:
    spec = {"tasks": [{"name": "work", "operator": "noop"}]}
    with db.transaction() as s:
        tenant = ensure_tenant(s, "acme")
        job, _ = create_job(s, tenant.id, dag.plan("dag", spec), "dag")
        return job.tasks[0]


def _write(db: Database, task: Task, attempt: int, text: str) -> None:
    now = utcnow()
    with db.transaction() as s:
        write_task_log(
            s,
            task,
            attempt,
            outcome="succeeded",
            text=text,
            dropped_chars=0,
            started_at=now - timedelta(seconds=1),
            finished_at=now,
        )


def test_a_second_write_of_an_attempt_keeps_the_first(db: Database) -> None:
    task = _task(db)
    _write(db, task, 1, "first")
    _write(db, task, 1, "redelivered")
    _write(db, task, 2, "second attempt")
    with db.transaction() as s:
        logs = read_task_logs(s, task.tenant_id, task.job_id, "work")
        assert [(log.attempt, log.text) for log in logs] == [(1, "first"), (2, "second attempt")]
        assert all(log.created_at is not None for log in logs)


def test_writes_that_need_not_wait_for_the_disk_are_still_visible(db: Database) -> None:
    """A worker's engine (``durable=False``) commits without waiting for the WAL's fsync;
    what it wrote is visible to everyone else at once all the same."""
    task = _task(db)
    worker_db = get_database(db.url, durable=False)
    assert worker_db is not get_database(db.url)
    if not db.is_sqlite:
        with worker_db.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
        with get_database(db.url).engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    _write(worker_db, task, 1, "from a worker")
    with db.transaction() as s:
        texts = s.execute(select(TaskLog.text).where(TaskLog.task_id == task.id)).scalars()
        assert list(texts) == ["from a worker"]

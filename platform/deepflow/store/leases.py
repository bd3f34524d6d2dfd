"""The lease reconciler: the database, not the broker, guarantees no work is lost.

A running task's lease lapses when its worker stops heartbeating (killed, partitioned) and
its deadline passes when it overruns ``timeout_s``. Either way the attempt is over: the
reconciler ends it (retry with backoff, or fail after the last attempt) and advances the
job, so a lost broker message or a dead worker delays a task but never strands it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from deepflow.dag import TaskState
from deepflow.store.db import Database
from deepflow.store.jobs import advance_job
from deepflow.store.orm import Task
from deepflow.store.tasks import end_attempt
from deepflow.store.transitions import lock_task
from deepflow.store.types import utcnow

log = logging.getLogger(__name__)

DEADLINE_GRACE_S = 5.0
"""The reconciler ends a timed-out attempt only this long after its deadline. A live worker
stops its attempt at the deadline itself (SIGTERM, SIGKILL 2 s later) and reports the timeout;
ending it earlier here would let a retry start while the stopped attempt is still dying. A dead
worker's attempt is ended by its lease expiring, or by this."""


def expire_leases(db: Database, now: datetime | None = None, limit: int = 100) -> list[str]:
    """End every attempt whose lease or deadline has passed; returns the task ids.

    Each task is handled in its own transaction that locks the job, then the task, and
    checks again: a heartbeat or a result may have arrived since the candidates were read.
    """
    now = now or utcnow()
    overdue = now - timedelta(seconds=DEADLINE_GRACE_S)
    with db.transaction() as session:
        candidates = (
            session.execute(
                select(Task.id)
                .where(
                    Task.state == TaskState.RUNNING,
                    or_(Task.lease_expires_at < now, Task.deadline_at < overdue),
                )
                .order_by(Task.lease_expires_at)
                .limit(limit)
            )
            .scalars()
            .all()
        )
    ended: list[str] = []
    for task_id in candidates:
        with db.transaction() as session:
            task = lock_task(session, task_id)
            if task.state is not TaskState.RUNNING:
                continue
            if task.deadline_at is not None and task.deadline_at < overdue:
                why = f"timed out after {task.timeout_s:g}s"
            elif task.lease_expires_at is not None and task.lease_expires_at < now:
                why = f"lease expired: worker {task.lease_owner} stopped heartbeating"
            else:
                continue
            log.warning("task %s attempt %d: %s", task.id, task.attempt, why)
            end_attempt(session, task.id, why, now)
            advance_job(session, task.job_id, now)
            ended.append(task.id)
    return ended


class Reconciler:
    """Runs ``expire_leases`` (and any ``extra_passes``, such as re-dispatching jobs whose
    flow run could not be created) every ``interval_s`` in a daemon thread until stopped."""

    def __init__(
        self,
        db: Database,
        interval_s: float = 5.0,
        extra_passes: Sequence[Callable[[], object]] = (),
    ) -> None:
        self.db = db
        self.interval_s = interval_s
        self.passes: list[Callable[[], object]] = [lambda: expire_leases(db), *extra_passes]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lease-reconciler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for reconcile in self.passes:
                try:
                    reconcile()
                except Exception:  # a database hiccup must not kill the reconciler
                    log.exception("reconciliation failed; retrying in %.1fs", self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

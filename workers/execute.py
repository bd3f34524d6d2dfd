"""One attempt of one task, on a worker: claim the lease, run the operator, report.

The store decides what an outcome means (retry or fail); the worker only reports. The
operator runs in an attempt process (``attempt_process``), forked from this Celery pool
process, which meanwhile stays the attempt's supervisor: it renews the lease, watches the
deadline, and collects the operator's log and outcome, all in the calling thread. If the
lease is lost (the job was cancelled, or the reconciler gave the attempt up) or the deadline
passes, it kills the attempt's process (SIGTERM, then SIGKILL), which stops even an operator
inside C code, and reports: timed out -> ``fail_task``; lease lost -> nothing (the store has
moved on), only the log is kept.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from deepflow.config import Settings
from deepflow.dag import operators
from deepflow.store import (
    Database,
    LeaseLost,
    claim_task,
    fail_task,
    get_database,
    heartbeat_task,
    succeed_task,
)
from deepflow.store.logs import write_task_log
from deepflow.store.orm import Task
from deepflow.store.tasks import task_context
from deepflow.store.types import utcnow
from deepflow.workers import attempt_log
from deepflow.workers.attempt_child import AttemptStopped
from deepflow.workers.attempt_process import AttemptProcess, begin_attempt, end_attempt
from deepflow.workers.constants import HEARTBEATS_PER_LEASE, STOP_CHECK_S

__all__ = ["AttemptStopped", "StaleAttempt", "execute_task", "worker_id"]

log = logging.getLogger(__name__)


class StaleAttempt(RuntimeError):
    """The message names an attempt that is no longer current (a redelivery, a duplicate,
    or a cancelled task): nothing was run, or what ran was stopped."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def execute_task(task_id: str, attempt: int, settings: Settings | None = None) -> Any:
    """Run attempt ``attempt`` of task ``task_id``; returns the operator's output.

    Raises StaleAttempt when the attempt is not current (nothing ran) or was stopped because
    its lease was lost, and the operator's exception (after reporting it) when it fails.
    """
    settings = settings or Settings.from_env()
    # An attempt's writes are safe to redo (a lost claim or outcome runs the attempt again),
    # so they need not wait for the disk: a noop task's time was mostly two commits' fsyncs.
    db = get_database(settings.database_url, durable=False)
    me = worker_id()
    with db.transaction() as session:
        task = claim_task(session, task_id, me, attempt, settings.lease_ttl_s)
        if task is None:
            raise StaleAttempt(f"attempt {attempt} of task {task_id} is not current")
        operator, args, deadline = task.operator, dict(task.args), task.deadline_at
        if operators.is_registered(operator) and operators.get(operator).takes_context:
            args["context"] = task_context(session, task)
    guard = _Guard(db, task_id, me, attempt, settings.lease_ttl_s, deadline)
    end = _Ending(db, task, attempt, attempt_log.AttemptLog(), utcnow())
    process = begin_attempt(operator, args, end.log)
    try:
        stopped = guard.supervise(process)
    finally:
        outcome = end_attempt(process)
    if stopped is not None:
        end.log.write(f"attempt stopped: {stopped}\n")
        if stopped == "timed out":
            error = f"timed out after its deadline {deadline}"
            end.report("timed_out", lambda s: fail_task(s, task_id, me, attempt, error))
        else:
            end.report("stopped", None)
        raise StaleAttempt(f"attempt {attempt} of task {task_id} stopped: {stopped}")
    if outcome.error is not None:
        error = outcome.error
        end.report("failed", lambda s: fail_task(s, task_id, me, attempt, error))
        outcome.raise_error()
    try:
        end.report("succeeded", lambda s: succeed_task(s, task_id, me, attempt, outcome.output))
    except LeaseLost as exc:
        raise StaleAttempt(str(exc)) from None
    return outcome.output


@dataclass
class _Guard:
    """Keeps the attempt's lease and deadline while its process runs."""

    db: Database
    task_id: str
    worker: str
    attempt: int
    lease_ttl_s: float
    deadline: datetime | None
    _interval: float = field(init=False)
    _next_beat: float = field(init=False)

    def __post_init__(self) -> None:
        self._interval = min(self.lease_ttl_s / HEARTBEATS_PER_LEASE, STOP_CHECK_S)
        self._next_beat = time.monotonic() + self._interval

    def supervise(self, process: AttemptProcess) -> str | None:
        """Wait for the attempt; None when it finished, else why it was stopped. Any error
        of the guard itself stops the attempt too: nobody would be watching it."""
        try:
            while not process.wait(self._until_next_check()):
                reason = self._check()
                if reason is not None:
                    process.stop()
                    return reason
        except BaseException:
            process.stop()
            raise
        return None

    def _until_next_check(self) -> float:
        wait = self._next_beat - time.monotonic()
        if self.deadline is not None:
            wait = min(wait, (self.deadline - utcnow()).total_seconds())
        return max(wait, 0.0)

    def _check(self) -> str | None:
        if self.deadline is not None and utcnow() >= self.deadline:
            return "timed out"
        if time.monotonic() < self._next_beat:
            return None
        self._next_beat = time.monotonic() + self._interval
        try:
            with self.db.transaction() as session:
                heartbeat_task(session, self.task_id, self.worker, self.attempt, self.lease_ttl_s)
        except LeaseLost:
            return "lease lost"
        except Exception:  # a missed beat is survivable: the lease outlasts two more
            log.exception("heartbeat of task %s failed", self.task_id)
        return None


@dataclass
class _Ending:
    """Stores an attempt's log in the transaction that reports its outcome, so a failed
    state is never visible without its log."""

    db: Database
    task: Task
    attempt: int
    log: attempt_log.AttemptLog
    started_at: datetime

    def report(self, outcome: str, report: Callable[[Any], object] | None) -> None:
        """Write the log and run ``report`` (raising LeaseLost when the lease is gone: then
        only the log is kept, and a failure's LeaseLost is just logged)."""
        text, finished = self.log.text(), utcnow()

        def save(session: Any) -> None:
            write_task_log(
                session,
                self.task,
                self.attempt,
                outcome=outcome,
                text=text,
                dropped_chars=self.log.dropped,
                started_at=self.started_at,
                finished_at=finished,
            )

        try:
            with self.db.transaction() as session:
                save(session)
                if report is not None:
                    report(session)
        except LeaseLost:
            with self.db.transaction() as session:
                save(session)
            if outcome == "succeeded":
                raise
            log.warning(
                "task %s attempt %d failed after losing its lease", self.task.id, self.attempt
            )

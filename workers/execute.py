"""One attempt of one task, on a worker: claim the lease, run the operator, report.

The store decides what an outcome means (retry or fail); the worker only reports. While
the operator runs, a guard thread renews the lease and watches the deadline. If the lease
is lost (the job was cancelled, or the reconciler gave the attempt up) or the deadline
passes, the guard stops the operator by raising ``AttemptStopped`` in its thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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
from deepflow.workers.constants import HEARTBEATS_PER_LEASE

log = logging.getLogger(__name__)


class AttemptStopped(BaseException):
    """Raised inside the operator's thread by the guard. A BaseException, so an operator's
    own ``except Exception`` does not swallow it."""


class StaleAttempt(RuntimeError):
    """The message names an attempt that is no longer current (a redelivery, a duplicate,
    or a cancelled task): nothing was run."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _Guard:
    db: Database
    task_id: str
    worker: str
    attempt: int
    lease_ttl_s: float
    deadline: datetime | None
    reason: str | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._target = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, name="lease-guard", daemon=True)

    def __enter__(self) -> _Guard:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._stop.set()
            # An interrupt aimed at the operator must not land after it returned.
            _set_async_exc(self._target, None)
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        interval = self.lease_ttl_s / HEARTBEATS_PER_LEASE
        while not self._stop.wait(min(interval, self._until_deadline())):
            if self.deadline is not None and utcnow() >= self.deadline:
                self._interrupt("timed out")
                return
            try:
                with self.db.transaction() as session:
                    heartbeat_task(
                        session, self.task_id, self.worker, self.attempt, self.lease_ttl_s
                    )
            except LeaseLost:
                self._interrupt("lease lost")
                return
            except Exception:  # a missed beat is survivable: the lease outlasts two more
                log.exception("heartbeat of task %s failed", self.task_id)

    def _until_deadline(self) -> float:
        if self.deadline is None:
            return float("inf")
        return max((self.deadline - utcnow()).total_seconds(), 0.0)

    def _interrupt(self, reason: str) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self.reason = reason
            _set_async_exc(self._target, AttemptStopped)


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in thread ``thread_id`` at its next bytecode (None clears a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None
    )


def execute_task(task_id: str, attempt: int, settings: Settings | None = None) -> Any:
    """Run attempt ``attempt`` of task ``task_id``; returns the operator's output.

    Raises StaleAttempt when the attempt is not current (nothing ran), and the operator's
    exception (after reporting it) when it fails.
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
    try:
        with attempt_log.capture(end.log), guard:
            output = operators.run(operator, args)
    except AttemptStopped:
        end.log.write(f"attempt stopped: {guard.reason}\n")
        if guard.reason == "timed out":
            error = f"timed out after its deadline {deadline}"
            end.report("timed_out", lambda s: fail_task(s, task_id, me, attempt, error))
        else:
            end.report("stopped", None)
        raise StaleAttempt(f"attempt {attempt} of task {task_id} stopped: {guard.reason}") from None
    except Exception as exc:
        end.log.write(traceback.format_exc())
        error = f"{type(exc).__name__}: {exc}"
        end.report("failed", lambda s: fail_task(s, task_id, me, attempt, error))
        raise
    try:
        end.report("succeeded", lambda s: succeed_task(s, task_id, me, attempt, output))
    except LeaseLost as exc:
        raise StaleAttempt(str(exc)) from None
    return output


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

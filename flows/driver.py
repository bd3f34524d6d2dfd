"""The job driver: runs one job's task DAG inside a Prefect flow run.

The store, not the futures, is the truth: every pass re-reads the job, applies the
ready-set function (``store.advance_job``), starts a new attempt for each ready task and
submits it to its resource-class queue through the Celery task runner. Futures only wake
the driver early. So a result that never arrives (a killed worker, a restarted broker) is
noticed through the store: the reconciler ends the attempt, the driver starts the next,
and an attempt whose message may be lost (the broker restarted since it was sent, or it
waited unclaimed too long) is sent again — duplicates are harmless because claims are
fenced by attempt. A driver that dies is replaced (``store.drivers``): the new one sends
again the attempts it finds queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prefect import task
from prefect.states import Cancelled, Failed, State
from sqlalchemy.exc import InterfaceError, OperationalError

from deepflow.dag import Dag, JobState, TaskState
from deepflow.store import Database, Job, Task, drive_job, job_dag
from deepflow.store.types import utcnow
from deepflow.workers.execute import StaleAttempt, execute_task
from deepflow.workers.prefect_celery import CeleryTaskRunner, PrefectCeleryFuture

log = logging.getLogger(__name__)

POLL_S = 1.0
"""Longest the driver sleeps without a future completing: how fast it notices what only
the store knows (cancellation, an expired lease, a retry falling due)."""

REDISPATCH_AFTER_S = 600.0
"""A task queued this long without a claim is sent again (its message may be lost)."""

DATABASE_OUTAGE_S = 600.0
"""How long a driver waits out an unreachable database (a restart) before it gives up."""

MAX_ACTIVE_TASKS = 32
"""A job's tasks queued or running at once, at most (``store.drive_job``'s ``max_active``):
enough to keep a machine's workers busy, few enough that a job submitted after a job of
thousands of tasks waits behind 32 of them, not thousands."""


@task(name="deepflow-task", task_run_name="{name} #{attempt}", persist_result=False)
def run_attempt(task_id: str, attempt: int, queue: str, name: str) -> Any:
    """The Prefect task a worker runs: one attempt of one of our tasks (``queue`` routes it;
    ``name``, the task's, names the task run). One Prefect task for every attempt: a task per
    name (``with_options``) read the function's source again for each attempt."""
    try:
        return execute_task(task_id, attempt)
    except StaleAttempt as exc:
        return Cancelled(message=str(exc))


@dataclass
class _Sent:
    attempt: int
    future: PrefectCeleryFuture[Any]
    sent_at: datetime
    epoch: str | None


@dataclass
class JobDriver:
    db: Database
    job_id: str
    runner: CeleryTaskRunner
    poll_s: float = POLL_S
    redispatch_after_s: float = REDISPATCH_AFTER_S
    max_active_tasks: int | None = MAX_ACTIVE_TASKS
    driver: int | None = None
    """This driver's number (``store.claim_driver``); None: the job is not fenced."""
    broker_epoch: Callable[[], str | None] = lambda: None
    """The broker's current life (``workers.app.broker_epoch``): a message sent in an earlier
    life was lost with it. None: unknown (unreachable, or a broker that keeps messages)."""
    _dag: Dag | None = None
    _wake: threading.Event = field(default_factory=threading.Event)
    _sent: dict[str, _Sent] = field(default_factory=dict)
    _epoch: str | None = None
    _epoch_read_at: float = float("-inf")

    def run(self) -> Job:
        """Drive the job until it is terminal; returns the final job row."""
        self._read_epoch()
        try:
            while True:
                ended = {task_id for task_id, s in self._sent.items() if s.future.done()}
                job, tasks, started = self._advance()
                if job.state.is_terminal:
                    return job
                for row in started:
                    self._send(row)
                self._wait(self._reconcile(tasks, ended))
        finally:
            for sent in self._sent.values():
                sent.future.cancel()  # revokes messages still queued

    def _wait(self, timeout: float) -> None:
        """Sleep until an attempt ends or ``timeout``. While at least half of
        ``max_active_tasks`` sent attempts are still in flight the workers have enough to do,
        so an ending is not worth a pass (each reads every task of the job): the driver waits
        for fewer in flight. A level's last attempts, and every attempt of a small job, still
        wake it at once."""
        deadline = time.monotonic() + timeout
        busy = (self.max_active_tasks or 0) // 2
        while self._wake.wait(max(deadline - time.monotonic(), 0.0)):
            self._wake.clear()  # before counting: an ending after the count wakes us again
            if sum(not s.future.done() for s in self._sent.values()) < max(busy, 1):
                return

    def _advance(self) -> tuple[Job, list[Task], list[Task]]:
        """One pass; an unreachable database (a restart) is waited out, not fatal."""
        deadline = time.monotonic() + DATABASE_OUTAGE_S
        while True:
            try:
                return self._pass()
            except (OperationalError, InterfaceError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("job %s: the database is unreachable (%s); retrying", self.job_id, exc)
                time.sleep(self.poll_s)

    def _pass(self) -> tuple[Job, list[Task], list[Task]]:
        with self.db.transaction() as session:
            if self._dag is None:
                self._dag = job_dag(session, self.job_id)[0]
            step = drive_job(
                session,
                self.job_id,
                self._dag,
                max_active=self.max_active_tasks,
                driver=self.driver,
            )
        return step.job, step.tasks, step.queued

    def _send(self, row: Task) -> None:
        parameters = {
            "task_id": row.id,
            "attempt": row.attempt,
            "queue": row.resource_class.value,
            "name": row.name,
        }
        future = self.runner.submit(run_attempt, parameters)
        future.add_done_callback(lambda _: self._wake.set())
        self._sent[row.id] = _Sent(row.attempt, future, utcnow(), self._epoch)

    def _reconcile(self, tasks: list[Task], ended: set[str]) -> float:
        """Forget futures of attempts the store has moved past, send again the queued ones
        whose message may be lost (or that an earlier driver of the job sent, or whose
        message a worker consumed without claiming it: ``ended`` are the tasks whose future
        had ended before the pass read the store), and return how long to sleep (until the
        next retry falls due, at most ``poll_s``)."""
        now = utcnow()
        timeout = self.poll_s
        if any(t.state is TaskState.QUEUED for t in tasks):
            self._read_epoch()
        for t in tasks:
            sent = self._sent.get(t.id)
            if sent is not None and (sent.attempt != t.attempt or t.state.is_terminal):
                del self._sent[t.id]
            elif t.state is TaskState.QUEUED and (why := self._lost(sent, now, t.id in ended)):
                log.warning("task %s attempt %d: %s; sending it again", t.name, t.attempt, why)
                self._send(t)
            if t.state is TaskState.UP_FOR_RETRY and t.next_attempt_at is not None:
                timeout = min(timeout, max((t.next_attempt_at - now).total_seconds(), 0.01))
        return timeout

    def _read_epoch(self) -> None:
        """Ask the broker for its life at most once a ``poll_s``: passes come as fast as
        attempts finish, and each read is a round trip."""
        if time.monotonic() - self._epoch_read_at >= self.poll_s:
            self._epoch = self.broker_epoch()
            self._epoch_read_at = time.monotonic()

    def _lost(self, sent: _Sent | None, now: datetime, consumed: bool) -> str | None:
        """Why a queued attempt's message may be lost, or None."""
        if sent is None:
            return "queued by an earlier driver of the job"
        if consumed:  # a claim commits before the attempt runs: this one never claimed
            return "a worker took its message but could not claim it (the database was down?)"
        if None not in (sent.epoch, self._epoch) and sent.epoch != self._epoch:
            return "the broker restarted since it was sent"
        if now - sent.sent_at > timedelta(seconds=self.redispatch_after_s):
            return "unclaimed too long"
        return None


def route_by_queue_parameter(task: Any, parameters: dict[str, Any]) -> str | None:
    """Send each attempt to its resource class's queue (no tags: see CeleryTaskRunner)."""
    queue = parameters.get("queue")
    return queue if isinstance(queue, str) else None


def final_state(job: Job) -> State[Any] | dict[str, Any] | None:
    """What the flow run returns: the job's result, or a Failed/Cancelled state."""
    if job.state is JobState.SUCCEEDED:
        return job.result
    if job.state is JobState.CANCELLED:
        return Cancelled(message=job.error or "job cancelled")
    return Failed(message=job.error or "job failed")

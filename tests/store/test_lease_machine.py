"""The lease protocol under every interleaving Hypothesis finds: a driver queueing attempts, a
broker that delivers any sent message to any worker any number of times (duplicates and stale
attempts included), workers that heartbeat, report or go silent, a clock that jumps, and the
reconciler. Whatever the order: a task is never held by two workers, only the current lease
holder's report counts, attempts stay within the retries, a finished task stays finished, and
its event history is an unbroken chain of legal changes."""

from __future__ import annotations

import itertools
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from deepflow import dag
from deepflow.dag import TaskState
from deepflow.store import (
    Database,
    Event,
    LeaseLost,
    Task,
    advance_job,
    claim_task,
    create_job,
    ensure_tenant,
    expire_leases,
    fail_task,
    heartbeat_task,
    queue_task,
    succeed_task,
)

TTL_S = 30.0
RETRIES = 2
WORKERS = ("w1", "w2", "w3")
SPEC = {
    "tasks": [
        {"name": "work", "operator": "noop", "retries": RETRIES, "retry_delay_s": 5,
         "retry_backoff": 1, "timeout_s": 3600},
        {"name": "after", "operator": "noop", "depends_on": ["work"]},
    ]
}  # fmt: skip


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self, template: Path, folder: Path) -> None:
        super().__init__()
        path = folder / f"{uuid.uuid4().hex}.db"
        shutil.copy(template, path)
        self.db = Database(f"sqlite:///{path}")
        with self.db.transaction() as s:
            job, _ = create_job(s, ensure_tenant(s, "acme").id, dag.plan("dag", SPEC), "dag")
            self.job_id, self.task_id = job.id, job.tasks[0].id
        self.now = datetime(2030, 1, 1, tzinfo=UTC)  # the protocol's clock; fixed: replayable
        self.sent: list[int] = []
        """Attempts whose message the driver sent: the broker may deliver any of them."""
        self.holding: dict[str, int] = {}
        """Worker -> the attempt it claimed and believes it still holds."""
        self.reported: list[tuple[str, int]] = []
        """Reports the store accepted (success or failure)."""
        self.finished_as: TaskState | None = None

    def teardown(self) -> None:
        self.db.dispose()

    def _task(self) -> Task:
        with self.db.transaction() as s:
            task = s.get(Task, self.task_id)
            assert task is not None
            s.expunge(task)
            return task

    @rule()
    def driver_queues_what_is_ready(self) -> None:
        with self.db.transaction() as s:
            if "work" in advance_job(s, self.job_id, self.now).ready:
                self.sent.append(queue_task(s, self.task_id).attempt)

    @precondition(lambda self: self.sent)
    @rule(worker=st.sampled_from(WORKERS), data=st.data())
    def broker_delivers(self, worker: str, data: st.DataObject) -> None:
        attempt = data.draw(st.sampled_from(self.sent), label="attempt")
        before = self._task()
        with self.db.transaction() as s:
            claimed = claim_task(s, self.task_id, worker, attempt, TTL_S, self.now)
        if claimed is None:
            assert before.state is not TaskState.QUEUED or before.attempt != attempt
            return
        assert before.state is TaskState.QUEUED and before.attempt == attempt
        assert not [w for w, a in self.holding.items() if a == attempt and w != worker]
        self.holding[worker] = attempt

    @precondition(lambda self: self.holding)
    @rule(data=st.data())
    def worker_heartbeats(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(sorted(self.holding)), label="worker")
        try:
            with self.db.transaction() as s:
                heartbeat_task(s, self.task_id, worker, self.holding[worker], TTL_S, self.now)
        except LeaseLost:
            del self.holding[worker]  # it stops working on the attempt

    @precondition(lambda self: self.holding)
    @rule(data=st.data(), succeeded=st.booleans())
    def worker_reports(self, data: st.DataObject, succeeded: bool) -> None:
        worker = data.draw(st.sampled_from(sorted(self.holding)), label="worker")
        attempt = self.holding.pop(worker)
        before = self._task()
        current = (before.state, before.lease_owner, before.attempt)
        try:
            with self.db.transaction() as s:
                if succeeded:
                    succeed_task(s, self.task_id, worker, attempt, {"by": worker})
                else:
                    fail_task(s, self.task_id, worker, attempt, "boom", self.now)
        except LeaseLost:
            assert current != (TaskState.RUNNING, worker, attempt)
            return
        assert current == (TaskState.RUNNING, worker, attempt)  # only the holder's report
        self.reported.append((worker, attempt))

    @rule(seconds=st.sampled_from([1.0, 10.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    @rule()
    def reconciler_runs(self) -> None:
        expire_leases(self.db, self.now)

    @invariant()
    def one_holder_and_attempts_within_retries(self) -> None:
        task = self._task()
        assert 0 <= task.attempt <= RETRIES + 1
        if task.state is TaskState.RUNNING:
            assert task.lease_owner is not None and task.lease_expires_at is not None
            assert self.holding.get(task.lease_owner) == task.attempt
        holders = [w for w, a in self.holding.items() if a == task.attempt]
        if task.state is not TaskState.RUNNING:
            assert not holders or all(
                w != task.lease_owner or task.state.is_terminal for w in holders
            )
        assert len({a for _, a in self.reported}) == len(self.reported)  # one report an attempt

    @invariant()
    def finished_stays_finished(self) -> None:
        state = self._task().state
        if self.finished_as is not None:
            assert state is self.finished_as
        elif state.is_terminal:
            self.finished_as = state
            if state is TaskState.SUCCEEDED:
                assert self._task().output == {"by": self.reported[-1][0]}

    @invariant()
    def history_is_an_unbroken_chain(self) -> None:
        with self.db.transaction() as s:
            chain = s.execute(
                select(Event.from_state, Event.to_state)
                .where(Event.entity_id == self.task_id)
                .order_by(Event.id)
            ).all()
        assert chain[0][0] is None and chain[0][1] == "pending"
        for (_, to), (frm, _) in itertools.pairwise(chain):
            assert frm == to
        assert chain[-1][1] == self._task().state.value


@pytest.mark.timeout(300)
def test_lease_protocol_under_any_interleaving(sqlite_template: Path, tmp_path: Path) -> None:
    run_state_machine_as_test(
        lambda: LeaseMachine(sqlite_template, tmp_path),
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None),
    )

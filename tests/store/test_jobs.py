"""Jobs in the store: creation, idempotency, reads, tenants, cancellation, progress."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select

from deepflow import dag
from deepflow.dag import JobState, TaskState
from deepflow.store import (
    Conflict,
    Database,
    Job,
    NotFound,
    Request,
    Task,
    TaskEdge,
    advance_job,
    attach_flow_run,
    cancel_job,
    claim_task,
    create_job,
    drive_job,
    ensure_tenant,
    job_dag,
    list_jobs,
    queue_task,
    read_job,
    read_job_events,
    set_task_state,
    succeed_task,
)

FAN = {
    "tasks": [
        {"name": "start", "operator": "noop"},
        {"name": "left", "operator": "echo", "args": {"side": "l"}, "depends_on": ["start"]},
        {"name": "right", "operator": "echo", "args": {"side": "r"}, "depends_on": ["start"]},
        {"name": "join", "operator": "noop", "depends_on": ["left", "right"], "priority": 5},
    ]
}


def _tenant(db: Database, name: str = "acme") -> str:
    with db.transaction() as s:
        return ensure_tenant(s, name).id


def _create(
    db: Database, tenant_id: str, spec: dict[str, Any] = FAN, key: str | None = None
) -> Job:
    with db.transaction() as s:
        job, _ = create_job(s, tenant_id, dag.plan("dag", spec), "dag", key)
        return job


def _count(db: Database, model: type) -> int:
    with db.transaction() as s:
        return s.execute(select(func.count()).select_from(model)).scalar_one()


def test_create_job_persists_request_tasks_and_edges(db: Database) -> None:
    tenant = _tenant(db)
    job = _create(db, tenant)
    with db.transaction() as s:
        stored = read_job(s, tenant, job.id)
        assert stored.state is JobState.PENDING and stored.kind == "dag"
        assert [t.name for t in stored.tasks] == ["start", "left", "right", "join"]
        names = {t.id: t.name for t in stored.tasks}
        edges = {(names[e.upstream_id], names[e.downstream_id]) for e in stored.edges}
        assert edges == {("start", "left"), ("start", "right"), ("left", "join"), ("right", "join")}
        request = s.get(Request, stored.request_id)
        assert request is not None and request.body["spec"]["tasks"][1]["args"] == {"side": "l"}
        assert all(t.state is TaskState.PENDING and t.attempt == 0 for t in stored.tasks)


def test_idempotency_key_returns_first_job_and_rejects_other_body(db: Database) -> None:
    tenant = _tenant(db)
    first = _create(db, tenant, key="k1")
    with db.transaction() as s:
        again, created = create_job(s, tenant, dag.plan("dag", FAN), "dag", "k1")
    assert again.id == first.id and not created
    other = {"tasks": [{"name": "x", "operator": "noop"}]}
    with pytest.raises(Conflict) as err, db.transaction() as s:
        create_job(s, tenant, dag.plan("dag", other), "dag", "k1")
    assert err.value.code == "idempotency_key_reused"
    # another tenant may use the same key for its own job
    assert _create(db, _tenant(db, "other"), key="k1").id != first.id
    assert _count(db, Job) == 2


def test_tenants_never_see_each_others_jobs(db: Database) -> None:
    acme, other = _tenant(db, "acme"), _tenant(db, "other")
    job = _create(db, acme)
    with db.transaction() as s:
        with pytest.raises(NotFound):
            read_job(s, other, job.id)
        with pytest.raises(NotFound):
            read_job_events(s, other, job.id)
        with pytest.raises(NotFound):
            cancel_job(s, other, job.id)
        assert list_jobs(s, other).jobs == []
    with db.transaction() as s:
        assert read_job(s, acme, job.id).state is JobState.PENDING


def test_list_jobs_filters_and_pages_newest_first(db: Database) -> None:
    tenant = _tenant(db)
    ids = [_create(db, tenant).id for _ in range(5)]
    with db.transaction() as s:
        cancel_job(s, tenant, ids[1])
    with db.transaction() as s:
        page1 = list_jobs(s, tenant, limit=2)
        page2 = list_jobs(s, tenant, limit=2, after=page1.jobs[-1].id)
        page3 = list_jobs(s, tenant, limit=2, after=page2.jobs[-1].id)
        assert [j.id for j in page1.jobs + page2.jobs + page3.jobs] == ids[::-1]
        assert (page1.has_more, page2.has_more, page3.has_more) == (True, True, False)
        assert [j.id for j in list_jobs(s, tenant, state=JobState.CANCELLED).jobs] == [ids[1]]
        assert list_jobs(s, tenant, kind="deploy").jobs == []
        with pytest.raises(NotFound):
            list_jobs(s, tenant, after="job_nope")


def test_cancel_ends_every_task_and_refuses_finished_jobs(db: Database) -> None:
    tenant = _tenant(db)
    job = _create(db, tenant)
    start = job.tasks[0].id
    with db.transaction() as s:
        queue_task(s, start)
        claim_task(s, start, "w1", 1, 30)
    with db.transaction() as s:
        cancelled = cancel_job(s, tenant, job.id)
        assert cancelled.state is JobState.CANCELLED
    with db.transaction() as s:
        stored = read_job(s, tenant, job.id)
        assert {t.state for t in stored.tasks} == {TaskState.CANCELLED}
        assert all(t.lease_owner is None for t in stored.tasks)
    with pytest.raises(Conflict, match="already cancelled"), db.transaction() as s:
        cancel_job(s, tenant, job.id)


def _run_ready(db: Database, job_id: str, outcome: str = "succeed") -> list[str]:
    """Queue, claim and finish every ready task once; returns their names."""
    with db.transaction() as s:
        ready = advance_job(s, job_id).ready
        tasks = {t.name: t for t in s.execute(select(Task).where(Task.job_id == job_id)).scalars()}
    for name in ready:
        with db.transaction() as s:
            attempt = queue_task(s, tasks[name].id).attempt
            assert claim_task(s, tasks[name].id, "w1", attempt, 30) is not None
            succeed_task(s, tasks[name].id, "w1", attempt, {"done": name})
    return ready


def test_advance_runs_a_fan_out_fan_in_to_success(db: Database) -> None:
    tenant = _tenant(db)
    job = _create(db, tenant)
    assert _run_ready(db, job.id) == ["start"]
    assert _run_ready(db, job.id) == ["left", "right"]
    assert _run_ready(db, job.id) == ["join"]
    with db.transaction() as s:
        assert advance_job(s, job.id).job_state is JobState.SUCCEEDED
    with db.transaction() as s:
        stored = read_job(s, tenant, job.id)
        assert stored.state is JobState.SUCCEEDED
        assert stored.result == {"outputs": {"join": {"done": "join"}}}
        assert stored.started_at and stored.finished_at and stored.started_at <= stored.finished_at
        events = read_job_events(s, tenant, job.id)
        assert [(e.from_state, e.to_state, e.rule) for e in events if e.entity_type == "job"] == [
            (None, "pending", "CreateJob"),
            ("pending", "running", "StartJob"),
            ("running", "succeeded", "SucceedJob"),
        ]
        assert events == sorted(events, key=lambda e: e.id)
        assert read_job_events(s, tenant, job.id, after=events[2].id)[0].id == events[3].id


def test_rejected_plan_writes_nothing(db: Database) -> None:
    _tenant(db)
    with pytest.raises(dag.DagError):
        dag.plan("dag", {"tasks": [{"name": "a", "operator": "noop", "depends_on": ["a"]}]})
    assert (_count(db, Job), _count(db, Task), _count(db, TaskEdge), _count(db, Request)) == (
        0,
        0,
        0,
        0,
    )


@pytest.mark.parametrize("queued", [False, True], ids=["pending", "queued"])
def test_a_job_whose_tasks_never_ran_succeeds_without_a_start(db: Database, queued: bool) -> None:
    """When no task runs (here the root is skipped, as a branch would skip it, and the
    trigger rules skip the rest), the job goes from pending or queued straight to succeeded:
    its events record no start that did not happen, and it has no ``started_at``."""
    tenant = _tenant(db)
    job = _create(db, tenant)
    if queued:
        with db.transaction() as s:
            attach_flow_run(s, job.id, "flow-run-1")
    with db.transaction() as s:
        set_task_state(s, job.tasks[0].id, TaskState.SKIPPED, reason="branch not taken")
    with db.transaction() as s:
        decision = advance_job(s, job.id)
        assert decision.ready == [] and decision.skipped == ["left", "right", "join"]
        assert decision.job_state is JobState.SUCCEEDED
    with db.transaction() as s:
        stored = read_job(s, tenant, job.id)
        assert stored.state is JobState.SUCCEEDED
        assert stored.started_at is None and stored.finished_at is not None
        events = read_job_events(s, tenant, job.id)
    before = [("pending", "queued", "QueueJob")] if queued else []
    assert [(e.from_state, e.to_state, e.rule) for e in events if e.entity_type == "job"] == [
        (None, "pending", "CreateJob"),
        *before,
        ("queued" if queued else "pending", "succeeded", "SucceedJobWithoutRunning"),
    ]
    names = {t.id: t.name for t in job.tasks}
    task_events = [
        (names[e.entity_id], e.rule, e.reason) for e in events if e.entity_type == "task"
    ]
    assert task_events == [
        *((name, "CreateTask", None) for name in ("start", "left", "right", "join")),
        ("start", "SkipTask", "branch not taken"),
        *((name, "SkipTask", "trigger rule") for name in ("left", "right", "join")),
    ]


def test_drive_job_keeps_at_most_max_active_tasks_queued_or_running(db: Database) -> None:
    """Ten independent tasks, priorities 0-9, a cap of 3: the three highest go first, and
    each pass tops the job up to three, never more."""
    spec = {"tasks": [{"name": f"t{i}", "operator": "noop", "priority": i} for i in range(10)]}
    job = _create(db, _tenant(db), spec)
    with db.transaction() as s:
        the_dag = job_dag(s, job.id)[0]
        queued = drive_job(s, job.id, the_dag, max_active=3).queued
        assert [t.name for t in queued] == ["t9", "t8", "t7"]
        assert drive_job(s, job.id, the_dag, max_active=3).queued == []  # still 3 active
        finished = queued[0]
        assert claim_task(s, finished.id, "w", finished.attempt, 30.0) is not None
        succeed_task(s, finished.id, "w", finished.attempt)
        assert [t.name for t in drive_job(s, job.id, the_dag, max_active=3).queued] == ["t6"]
        states = Counter(t.state for t in s.scalars(select(Task).where(Task.job_id == job.id)))
        assert states[TaskState.QUEUED] == 3 and states[TaskState.PENDING] == 6

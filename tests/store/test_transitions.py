"""State changes, creation included, go through one function per entity, reject illegal
moves, write events."""

from __future__ import annotations

from enum import StrEnum

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from deepflow import dag
from deepflow.dag import JobState, TaskState
from deepflow.store import (
    Database,
    DeploymentState,
    Event,
    IllegalTransition,
    InstanceState,
    Job,
    ModelVersionState,
    Request,
    Task,
    create_deployment,
    create_instance,
    create_job,
    ensure_tenant,
    register_model_version,
    set_instance_state,
    set_job_state,
    set_model_version_state,
    set_task_state,
)
from deepflow.store.policy import (
    DEPLOYMENT_POLICY,
    INSTANCE_POLICY,
    JOB_POLICY,
    MODEL_VERSION_POLICY,
    NEW,
    TASK_POLICY,
    Rule,
)
from deepflow.store.transitions import lock, set_task_states
from deepflow.store.types import new_id

POLICIES: list[tuple[tuple[Rule, ...], type[StrEnum]]] = [
    (JOB_POLICY, JobState),
    (TASK_POLICY, TaskState),
    (INSTANCE_POLICY, InstanceState),
    (DEPLOYMENT_POLICY, DeploymentState),
    (MODEL_VERSION_POLICY, ModelVersionState),
]

SPEC = {
    "tasks": [
        {"name": "a", "operator": "noop"},
        {"name": "b", "operator": "noop", "depends_on": ["a"]},
    ]
}


def _job(db: Database) -> tuple[str, str, dict[str, str]]:
    with db.transaction() as s:
        tenant = ensure_tenant(s, "t1")
        job, _ = create_job(s, tenant.id, dag.plan("dag", SPEC), "dag")
        return tenant.id, job.id, {t.name: t.id for t in job.tasks}


def _events(db: Database, entity_id: str) -> list[Event]:
    with db.transaction() as s:
        stmt = select(Event).where(Event.entity_id == entity_id).order_by(Event.id)
        return list(s.execute(stmt).scalars())


def test_legal_job_transition_writes_its_event(db: Database) -> None:
    _, job_id, _ = _job(db)
    with db.transaction() as s:
        set_job_state(s, job_id, JobState.QUEUED)
    events = _events(db, job_id)
    assert [(e.from_state, e.to_state, e.rule) for e in events] == [
        (None, "pending", "CreateJob"),
        ("pending", "queued", "QueueJob"),
    ]


def test_illegal_transition_is_rejected_and_writes_nothing(db: Database) -> None:
    _, job_id, tasks = _job(db)
    with db.transaction() as s:
        set_job_state(s, job_id, JobState.QUEUED)
    illegal = pytest.raises(IllegalTransition, match="cannot go from queued to pending")
    with illegal, db.transaction() as s:
        set_job_state(s, job_id, JobState.PENDING)
    with pytest.raises(IllegalTransition), db.transaction() as s:
        set_task_state(s, tasks["a"], TaskState.RUNNING)  # must be queued first
    assert [e.rule for e in _events(db, job_id)] == ["CreateJob", "QueueJob"]
    assert [e.rule for e in _events(db, tasks["a"])] == ["CreateTask"]
    with db.transaction() as s:
        assert s.get(Job, job_id).state is JobState.QUEUED  # type: ignore[union-attr]
        assert s.get(Task, tasks["a"]).state is TaskState.PENDING  # type: ignore[union-attr]


def test_creating_a_job_writes_its_and_its_tasks_creation_events(db: Database) -> None:
    _, job_id, tasks = _job(db)
    with db.transaction() as s:
        stmt = select(Event).where(Event.job_id == job_id).order_by(Event.id)
        events = [(e.entity_id, e.from_state, e.to_state, e.rule) for e in s.scalars(stmt)]
    assert events == [
        (job_id, None, "pending", "CreateJob"),
        (tasks["a"], None, "pending", "CreateTask"),
        (tasks["b"], None, "pending", "CreateTask"),
    ]


def test_a_row_starts_only_where_its_creation_rule_says(db: Database) -> None:
    """The writer refuses a first state the policy does not name, and a row that never went
    through the writer has no state and is refused by the database."""
    with db.transaction() as s:
        tenant = ensure_tenant(s, "t1")
        request = Request(id=new_id("req"), tenant_id=tenant.id, kind="k", body={}, body_hash="h")
        s.add(request)
    with pytest.raises(IllegalTransition, match="cannot start in running"), db.transaction() as s:
        job = Job(id=new_id("job"), tenant_id=tenant.id, request_id=request.id, kind="dag", spec={})
        set_job_state(s, job, JobState.RUNNING)
    with pytest.raises(IntegrityError), db.transaction() as s:
        s.add(
            Job(id=new_id("job"), tenant_id=tenant.id, request_id=request.id, kind="dag", spec={})
        )
    with db.transaction() as s:
        assert s.execute(select(Job)).first() is None
        assert s.execute(select(Event)).first() is None


def test_a_batch_of_task_changes_is_checked_whole_before_any_is_applied(db: Database) -> None:
    _, job_id, tasks = _job(db)
    with db.transaction() as s:
        set_task_state(s, tasks["a"], TaskState.QUEUED)
    with db.transaction() as s:
        lock(s, Job, job_id)
        b, a = s.get(Task, tasks["b"]), s.get(Task, tasks["a"])
        with pytest.raises(IllegalTransition, match="cannot go from queued to skipped"):
            set_task_states(s, [b, a], TaskState.SKIPPED)  # type: ignore[list-item]
        assert b.state is TaskState.PENDING  # type: ignore[union-attr]  # though it came first
    assert [e.rule for e in _events(db, tasks["b"])] == ["CreateTask"]
    with db.transaction() as s:
        lock(s, Job, job_id)
        set_task_states(s, [s.get(Task, tasks["b"])], TaskState.SKIPPED, reason="why")  # type: ignore[list-item]
    assert [(e.from_state, e.rule, e.reason) for e in _events(db, tasks["b"])] == [
        (None, "CreateTask", None),
        ("pending", "SkipTask", "why"),
    ]


def test_event_and_change_share_one_transaction(db: Database) -> None:
    """A change rolled back takes its event with it."""
    _, job_id, _ = _job(db)
    with pytest.raises(RuntimeError), db.transaction() as s:
        set_job_state(s, job_id, JobState.QUEUED)
        raise RuntimeError("boom")
    assert [e.to_state for e in _events(db, job_id)] == ["pending"]


def test_terminal_states_have_no_way_out() -> None:
    for policy, states in ((JOB_POLICY, JobState), (TASK_POLICY, TaskState)):
        for rule in policy:
            assert not any(s is not NEW and s.is_terminal for s in rule.from_states), rule.name  # type: ignore[attr-defined]
        assert {r.to_state for r in policy} == set(states)


@pytest.mark.parametrize(("policy", "states"), POLICIES)
def test_each_policy_starts_its_rows_with_one_creation_rule(
    policy: tuple[Rule, ...], states: type[StrEnum]
) -> None:
    """The policy is the one place that says how rows start: its first rule, from NEW, and
    no other rule starts from NEW or returns to the first state."""
    first, *rest = policy
    assert first.from_states == {NEW} and first.name.startswith(("Create", "Register"))
    assert all(NEW not in rule.from_states for rule in rest)
    assert {first.to_state, *(r.to_state for r in rest)} == set(states)
    reached = {first.to_state}
    for _ in policy:  # every state is reachable from the first
        reached |= {r.to_state for r in rest if r.from_states & reached}
    assert reached == set(states)


def test_events_are_append_only(db: Database) -> None:
    _, job_id, _ = _job(db)
    with pytest.raises(RuntimeError, match="append-only"), db.transaction() as s:
        event = s.execute(select(Event).where(Event.entity_id == job_id)).scalar_one()
        event.reason = "rewritten"
    with pytest.raises(RuntimeError, match="append-only"), db.transaction() as s:
        s.delete(s.execute(select(Event).where(Event.entity_id == job_id)).scalar_one())


def test_instance_deployment_and_model_version_lifecycles(db: Database) -> None:
    with db.transaction() as s:
        tenant = ensure_tenant(s, "t1")
        dep = create_deployment(
            s,
            tenant.id,
            name="tiny",
            model_path="/models/tiny",
            replicas=1,
            resource_class=dag.ResourceClass.CPU,
            policy="round_robin",
        )
        inst = create_instance(s, tenant.id, model_name="tiny", device="cpu")
        v1 = register_model_version(s, tenant.id, "tiny", "/models/tiny")
        v2 = register_model_version(s, tenant.id, "tiny", "/models/tiny-2")
        assert (v1.version, v2.version) == (1, 2)
    with db.transaction() as s:
        set_instance_state(s, inst.id, InstanceState.READY)
        set_instance_state(s, inst.id, InstanceState.DRAINING)
        set_model_version_state(s, v1.id, ModelVersionState.READY)
    with pytest.raises(IllegalTransition), db.transaction() as s:
        set_instance_state(s, inst.id, InstanceState.READY)
    with pytest.raises(IllegalTransition), db.transaction() as s:
        set_model_version_state(s, v2.id, ModelVersionState.ARCHIVED)
    rules = [(e.from_state, e.rule) for e in _events(db, inst.id)]
    assert rules == [
        (None, "CreateInstance"),
        ("starting", "MarkInstanceReady"),
        ("ready", "DrainInstance"),
    ]
    assert [(e.from_state, e.rule) for e in _events(db, v1.id)] == [
        (None, "RegisterVersion"),
        ("registering", "PublishVersion"),
    ]
    assert [(e.from_state, e.to_state, e.rule) for e in _events(db, dep.id)] == [
        (None, "creating", "CreateDeployment")
    ]

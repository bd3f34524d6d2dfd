"""State changes go through one function per entity, reject illegal moves, write events."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from deepflow import dag
from deepflow.dag import JobState, TaskState
from deepflow.store import (
    Database,
    Event,
    IllegalTransition,
    InstanceState,
    ModelVersionState,
    create_instance,
    create_job,
    ensure_tenant,
    register_model_version,
    set_instance_state,
    set_job_state,
    set_model_version_state,
    set_task_state,
)
from deepflow.store.policy import JOB_POLICY, TASK_POLICY

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
    illegal = pytest.raises(IllegalTransition, match="cannot go from pending to succeeded")
    with illegal, db.transaction() as s:
        set_job_state(s, job_id, JobState.SUCCEEDED)
    with pytest.raises(IllegalTransition), db.transaction() as s:
        set_task_state(s, tasks["a"], TaskState.RUNNING)  # must be queued first
    assert len(_events(db, job_id)) == 1
    assert _events(db, tasks["a"]) == []


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
            assert not any(s.is_terminal for s in rule.from_states), rule.name  # type: ignore[attr-defined]
        targets = {r.to_state for r in policy}
        assert set(states) - {states("pending")} <= targets  # type: ignore[call-arg]


def test_events_are_append_only(db: Database) -> None:
    _, job_id, _ = _job(db)
    with pytest.raises(RuntimeError, match="append-only"), db.transaction() as s:
        event = s.execute(select(Event).where(Event.entity_id == job_id)).scalar_one()
        event.reason = "rewritten"
    with pytest.raises(RuntimeError, match="append-only"), db.transaction() as s:
        s.delete(s.execute(select(Event).where(Event.entity_id == job_id)).scalar_one())


def test_instance_and_model_version_lifecycles(db: Database) -> None:
    with db.transaction() as s:
        tenant = ensure_tenant(s, "t1")
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
    rules = [e.rule for e in _events(db, inst.id)]
    assert rules == ["CreateInstance", "MarkInstanceReady", "DrainInstance"]
    assert [e.rule for e in _events(db, v1.id)] == ["RegisterVersion", "PublishVersion"]

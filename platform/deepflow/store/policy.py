"""Every legal state change, as a named rule, in one ordered policy per entity.

A change that no rule allows is rejected by ``transitions.set_*_state``; the rule that
allowed a change is recorded on its event. Creation is a change too: from ``NEW`` (no row
yet) to the entity's first state, so each policy's first rule says how its rows start.
Deciding *which* change to make (retry or fail, skip or run) belongs to the callers; this
module only says what may follow what.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from deepflow.dag.states import JobState, TaskState
from deepflow.store.orm import DeploymentState, InstanceState, ModelVersionState

NEW = None
"""The from-state of a creation rule: the row does not exist yet."""

State = StrEnum | None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    from_states: frozenset[State]
    to_state: StrEnum
    why: str


def _rule(name: str, sources: set[State], target: StrEnum, why: str) -> Rule:
    return Rule(name, frozenset(sources), target, why)


J, T, I, M, D = JobState, TaskState, InstanceState, ModelVersionState, DeploymentState  # noqa: E741

JOB_POLICY: tuple[Rule, ...] = (
    _rule("CreateJob", {NEW}, J.PENDING, "A request was accepted; its tasks are created with it."),
    _rule("QueueJob", {J.PENDING}, J.QUEUED, "The orchestrator created the job's flow run."),
    _rule("StartJob", {J.PENDING, J.QUEUED}, J.RUNNING, "A worker claimed the job's first task."),
    _rule("SucceedJob", {J.RUNNING}, J.SUCCEEDED, "Every task is terminal, no leaf failed."),
    _rule(
        "SucceedJobWithoutRunning",
        {J.PENDING, J.QUEUED},
        J.SUCCEEDED,
        "Every task ended without running (skipped by its trigger rule) and no leaf failed: "
        "the DAG decided the job with nothing run, so it never was running and its event "
        "says so (no StartJob for a start that did not happen).",
    ),
    _rule(
        "FailJob",
        {J.PENDING, J.QUEUED, J.RUNNING},
        J.FAILED,
        "A leaf task failed, or the job could not be orchestrated at all.",
    ),
    _rule("CancelJob", {J.PENDING, J.QUEUED, J.RUNNING}, J.CANCELLED, "A user cancelled it."),
)

TASK_POLICY: tuple[Rule, ...] = (
    _rule("CreateTask", {NEW}, T.PENDING, "Created with its job; waits for its upstream tasks."),
    _rule(
        "QueueTask",
        {T.PENDING, T.UP_FOR_RETRY},
        T.QUEUED,
        "Its trigger rule fired (or its retry backoff passed); a new attempt is sent to a queue.",
    ),
    _rule("ClaimTask", {T.QUEUED}, T.RUNNING, "A worker took the attempt and holds its lease."),
    _rule("SucceedTask", {T.RUNNING}, T.SUCCEEDED, "The lease holder reported success."),
    _rule(
        "RetryTask",
        {T.RUNNING},
        T.UP_FOR_RETRY,
        "The attempt failed, timed out or lost its lease, and attempts remain.",
    ),
    _rule(
        "FailTask",
        {T.RUNNING},
        T.FAILED,
        "The last attempt failed, timed out or lost its lease.",
    ),
    _rule("SkipTask", {T.PENDING}, T.SKIPPED, "Its trigger rule can only be met by skipping."),
    _rule(
        "MarkUpstreamFailed",
        {T.PENDING},
        T.UPSTREAM_FAILED,
        "Upstream failures mean its trigger rule can never fire.",
    ),
    _rule(
        "CancelTask",
        {T.PENDING, T.QUEUED, T.RUNNING, T.UP_FOR_RETRY},
        T.CANCELLED,
        "Its job was cancelled.",
    ),
)

INSTANCE_POLICY: tuple[Rule, ...] = (
    _rule("CreateInstance", {NEW}, I.STARTING, "A replica is being launched for it."),
    _rule("MarkInstanceReady", {I.STARTING}, I.READY, "It passed its health check."),
    _rule("DrainInstance", {I.READY}, I.DRAINING, "Scaling in: finish what runs, admit nothing."),
    _rule(
        "StopInstance",
        {I.STARTING, I.READY, I.DRAINING},
        I.STOPPED,
        "It exited on request.",
    ),
    _rule(
        "FailInstance",
        {I.STARTING, I.READY, I.DRAINING},
        I.FAILED,
        "It died or missed its heartbeats.",
    ),
)

DEPLOYMENT_POLICY: tuple[Rule, ...] = (
    _rule("CreateDeployment", {NEW}, D.CREATING, "A user asked to serve a model."),
    _rule(
        "DeploymentReady",
        {D.CREATING, D.DEGRADED, D.FAILED},
        D.READY,
        "As many instances are ready as it asks for.",
    ),
    _rule("DegradeDeployment", {D.READY}, D.DEGRADED, "Fewer ready instances than it asks for."),
    _rule(
        "FailDeployment",
        {D.CREATING, D.DEGRADED},
        D.FAILED,
        "No instance could be brought up.",
    ),
    _rule(
        "DeleteDeployment",
        {D.CREATING, D.READY, D.DEGRADED, D.FAILED},
        D.DELETING,
        "A user deleted it; its instances are being stopped.",
    ),
    _rule("DeploymentDeleted", {D.DELETING}, D.DELETED, "Its last instance stopped."),
)

MODEL_VERSION_POLICY: tuple[Rule, ...] = (
    _rule("RegisterVersion", {NEW}, M.REGISTERING, "Its weights were named; not yet checked."),
    _rule("PublishVersion", {M.REGISTERING}, M.READY, "Its weights are complete and checked."),
    _rule("FailVersion", {M.REGISTERING}, M.FAILED, "Its weights could not be produced."),
    _rule("ArchiveVersion", {M.READY}, M.ARCHIVED, "Retired; no new instance may use it."),
)


def find_rule(policy: tuple[Rule, ...], current: State, target: StrEnum) -> Rule | None:
    """The first rule of ``policy`` that allows ``current -> target`` (``current`` is
    ``NEW`` for a row being created)."""
    for rule in policy:
        if rule.to_state == target and current in rule.from_states:
            return rule
    return None

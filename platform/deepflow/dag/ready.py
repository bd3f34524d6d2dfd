"""The ready-set function: from a DAG and its task states, what happens next.

Pure: no database, no clock of its own. The store applies the decision it returns in one
transaction; the orchestrator queues the ready tasks. Calling it again after applying a
decision (and before any task changes) decides nothing new about any task (a finished job
reports the same final state again), so it is safe to call on every event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from deepflow.dag.graph import Dag
from deepflow.dag.states import JobState, TaskState
from deepflow.dag.trigger_rules import UpstreamCounts, Verdict, judge

_LEAF_FAILURES = frozenset({TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.CANCELLED})


@dataclass(slots=True)
class Decision:
    ready: list[str] = field(default_factory=list)
    """Tasks to queue now, highest priority first (pending ones whose rule fired, and
    up_for_retry ones whose backoff has passed)."""
    skipped: list[str] = field(default_factory=list)
    upstream_failed: list[str] = field(default_factory=list)
    job_state: JobState | None = None
    """succeeded or failed once every task is terminal; None while work remains."""

    @property
    def is_empty(self) -> bool:
        return not (self.ready or self.skipped or self.upstream_failed or self.job_state)


def evaluate(
    dag: Dag,
    states: Mapping[str, TaskState],
    *,
    now: datetime | None = None,
    retry_at: Mapping[str, datetime | None] | None = None,
) -> Decision:
    """Decide which tasks are ready, which can never run, and whether the job is finished.

    Walks the DAG in topological order on a working copy of ``states`` so that a skip or an
    upstream failure cascades to every task it dooms in one call. A job ends ``failed`` when
    any leaf task failed, was cancelled or is ``upstream_failed`` (Airflow's rule), else
    ``succeeded``.
    """
    current = dict(states)
    decision = Decision()
    for name in dag.order:
        state = current[name]
        if state is TaskState.UP_FOR_RETRY:
            due = (retry_at or {}).get(name)
            if due is None or now is None or due <= now:
                decision.ready.append(name)
            continue
        if state is not TaskState.PENDING:
            continue
        task = dag.tasks[name]
        verdict = judge(task.trigger_rule, UpstreamCounts.of(current[u] for u in task.upstream))
        if verdict is Verdict.READY:
            decision.ready.append(name)
        elif verdict is Verdict.SKIP:
            current[name] = TaskState.SKIPPED
            decision.skipped.append(name)
        elif verdict is Verdict.UPSTREAM_FAILED:
            current[name] = TaskState.UPSTREAM_FAILED
            decision.upstream_failed.append(name)
    decision.ready.sort(key=lambda n: -dag.tasks[n].priority)
    if all(s.is_terminal for s in current.values()):
        failed = any(current[leaf] in _LEAF_FAILURES for leaf in dag.leaves)
        decision.job_state = JobState.FAILED if failed else JobState.SUCCEEDED
    return decision

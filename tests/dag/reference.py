"""An independent statement of Airflow 2's trigger-rule semantics, for the DAG tests.

Written from Airflow's documented behaviour, not from ``deepflow.dag.trigger_rules``: each
rule says when a task may run given the states of its direct upstreams, and when it can see
early that it never will (``skipped`` or ``upstream_failed``). DeepFlow's ``cancelled`` has no
Airflow counterpart; the package counts it as a failure (it produced nothing), and so does
this model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from deepflow.dag import TaskState, TriggerRule
from deepflow.dag.trigger_rules import Verdict

FAILURE_STATES = frozenset({TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.CANCELLED})
DONE_STATES = FAILURE_STATES | {TaskState.SUCCEEDED, TaskState.SKIPPED}

READY = Verdict.READY
WAIT = Verdict.WAIT
SKIP = Verdict.SKIP
UPFAIL = Verdict.UPSTREAM_FAILED


@dataclass(frozen=True)
class _Tally:
    n: int
    success: int
    skipped: int
    failed: int
    finished: bool


def _all_success(t: _Tally) -> Verdict:
    if t.failed:
        return UPFAIL
    if t.skipped:
        return SKIP
    return READY if t.success == t.n else WAIT


def _all_done(t: _Tally) -> Verdict:
    return READY if t.finished else WAIT


def _all_failed(t: _Tally) -> Verdict:
    if t.success or t.skipped:
        return SKIP
    return READY if t.failed == t.n else WAIT


def _one_success(t: _Tally) -> Verdict:
    if t.success:
        return READY
    if not t.finished:
        return WAIT
    return SKIP if t.skipped == t.n else UPFAIL


def _one_failed(t: _Tally) -> Verdict:
    if t.failed:
        return READY
    return SKIP if t.finished else WAIT


def _none_failed(t: _Tally) -> Verdict:
    if t.failed:
        return UPFAIL
    return READY if t.finished else WAIT


def _none_failed_min_one_success(t: _Tally) -> Verdict:
    if t.failed:
        return UPFAIL
    if t.skipped == t.n:
        return SKIP
    return READY if t.finished else WAIT


_RULES: dict[TriggerRule, Callable[[_Tally], Verdict]] = {
    TriggerRule.ALL_SUCCESS: _all_success,
    TriggerRule.ALL_DONE: _all_done,
    TriggerRule.ALL_FAILED: _all_failed,
    TriggerRule.ONE_SUCCESS: _one_success,
    TriggerRule.ONE_FAILED: _one_failed,
    TriggerRule.NONE_FAILED: _none_failed,
    TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS: _none_failed_min_one_success,
}


def airflow_verdict(rule: TriggerRule, upstream: Iterable[TaskState]) -> Verdict:
    """What Airflow 2 decides for a pending task with ``rule`` and these upstream states."""
    ups = list(upstream)
    if not ups or rule is TriggerRule.ALWAYS:
        return READY
    tally = _Tally(
        n=len(ups),
        success=sum(s is TaskState.SUCCEEDED for s in ups),
        skipped=sum(s is TaskState.SKIPPED for s in ups),
        failed=sum(s in FAILURE_STATES for s in ups),
        finished=all(s in DONE_STATES for s in ups),
    )
    return _RULES[rule](tally)


LEAF_FAILURES = FAILURE_STATES
"""A job fails when a leaf ends in one of these (Airflow's DagRun rule, plus cancelled)."""

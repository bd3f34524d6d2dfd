"""Airflow's trigger rules: when a task may run, given the states of its direct upstreams.

Each rule answers with one verdict. Besides "ready" and "wait", a rule can see that it will
never fire and say so early, as Airflow does: ``all_success`` turns ``upstream_failed`` as
soon as one upstream fails and ``skipped`` as soon as one is skipped; ``one_success`` waits
for every upstream before giving up. ``skipped`` and ``upstream_failed`` then cascade
downstream through the same rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from deepflow.dag.states import TaskState


class TriggerRule(StrEnum):
    ALL_SUCCESS = "all_success"
    ALL_DONE = "all_done"
    ALL_FAILED = "all_failed"
    ONE_SUCCESS = "one_success"
    ONE_FAILED = "one_failed"
    NONE_FAILED = "none_failed"
    NONE_FAILED_MIN_ONE_SUCCESS = "none_failed_min_one_success"
    ALWAYS = "always"


class Verdict(StrEnum):
    READY = "ready"
    WAIT = "wait"
    SKIP = "skip"
    UPSTREAM_FAILED = "upstream_failed"


# A cancelled upstream counts as a failure: it did not produce what its downstream needs.
_FAILURES = frozenset({TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class UpstreamCounts:
    total: int
    succeeded: int
    skipped: int
    failed: int
    """failed, upstream_failed and cancelled together."""
    done: int

    @classmethod
    def of(cls, states: Iterable[TaskState]) -> UpstreamCounts:
        counts = Counter(states)  # one pass in C: a dense DAG asks this of 50 upstreams each
        return cls(
            total=counts.total(),
            succeeded=counts[TaskState.SUCCEEDED],
            skipped=counts[TaskState.SKIPPED],
            failed=sum(n for s, n in counts.items() if s in _FAILURES),
            done=sum(n for s, n in counts.items() if s.is_terminal),
        )

    @property
    def all_done(self) -> bool:
        return self.done == self.total


def judge(rule: TriggerRule, up: UpstreamCounts) -> Verdict:
    """The verdict of ``rule`` over direct upstreams counted in ``up``."""
    if up.total == 0 or rule is TriggerRule.ALWAYS:
        return Verdict.READY
    return _JUDGES[rule](up)


def _all_success(up: UpstreamCounts) -> Verdict:
    if up.failed:
        return Verdict.UPSTREAM_FAILED
    if up.skipped:
        return Verdict.SKIP
    return Verdict.READY if up.succeeded == up.total else Verdict.WAIT


def _all_done(up: UpstreamCounts) -> Verdict:
    return Verdict.READY if up.all_done else Verdict.WAIT


def _all_failed(up: UpstreamCounts) -> Verdict:
    if up.succeeded or up.skipped:
        return Verdict.SKIP
    return Verdict.READY if up.failed == up.total else Verdict.WAIT


def _one_success(up: UpstreamCounts) -> Verdict:
    if up.succeeded:
        return Verdict.READY
    if not up.all_done:
        return Verdict.WAIT
    return Verdict.SKIP if up.skipped == up.total else Verdict.UPSTREAM_FAILED


def _one_failed(up: UpstreamCounts) -> Verdict:
    if up.failed:
        return Verdict.READY
    return Verdict.SKIP if up.all_done else Verdict.WAIT


def _none_failed(up: UpstreamCounts) -> Verdict:
    if up.failed:
        return Verdict.UPSTREAM_FAILED
    return Verdict.READY if up.all_done else Verdict.WAIT


def _none_failed_min_one_success(up: UpstreamCounts) -> Verdict:
    if up.failed:
        return Verdict.UPSTREAM_FAILED
    if up.skipped == up.total:
        return Verdict.SKIP
    return Verdict.READY if up.all_done else Verdict.WAIT


_JUDGES = {
    TriggerRule.ALL_SUCCESS: _all_success,
    TriggerRule.ALL_DONE: _all_done,
    TriggerRule.ALL_FAILED: _all_failed,
    TriggerRule.ONE_SUCCESS: _one_success,
    TriggerRule.ONE_FAILED: _one_failed,
    TriggerRule.NONE_FAILED: _none_failed,
    TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS: _none_failed_min_one_success,
}

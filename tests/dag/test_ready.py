"""The ready-set function, driven through whole DAG runs.

``drive`` plays orchestrator and workers: it calls ``evaluate``, applies its decision the way
the store does, queues the ready tasks and finishes each one as a script says. After every
decision it checks that calling ``evaluate`` again changes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest

from deepflow.dag import Dag, Decision, JobState, Node, TaskState, TriggerRule, evaluate

R = TriggerRule
T = TaskState
Outcome = Literal["ok", "fail"]
Script = Mapping[str, Outcome | Sequence[Outcome]]

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def dag_of(*nodes: tuple[str, str] | tuple[str, str, TriggerRule] | Node) -> Dag:
    """Nodes as ``(name, "up1 up2")`` or ``(name, "ups", rule)``."""
    built: list[Node] = []
    for n in nodes:
        if isinstance(n, Node):
            built.append(n)
        elif len(n) == 2:
            built.append(Node(n[0], tuple(n[1].split())))
        else:
            built.append(Node(n[0], tuple(n[1].split()), n[2]))
    return Dag.from_nodes(built)


@dataclass
class Run:
    states: dict[str, TaskState]
    job_state: JobState
    batches: list[list[str]] = field(default_factory=list)
    """Each decision's ready list, in order."""
    decisions: list[Decision] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)

    @property
    def ran(self) -> set[str]:
        return set(self.attempts)


def in_order(dag: Dag, names: set[str]) -> list[str]:
    """``names`` in the DAG's topological order (how evaluate lists its decisions)."""
    return [n for n in dag.order if n in names]


def apply(states: dict[str, TaskState], decision: Decision) -> None:
    for name in decision.skipped:
        assert states[name] is T.PENDING, name
        states[name] = T.SKIPPED
    for name in decision.upstream_failed:
        assert states[name] is T.PENDING, name
        states[name] = T.UPSTREAM_FAILED
    for name in decision.ready:
        assert states[name] in (T.PENDING, T.UP_FOR_RETRY), name
        states[name] = T.QUEUED


def outcome(script: Script, name: str, attempt: int) -> tuple[Outcome, bool]:
    """The outcome of attempt ``attempt`` (1-based), and whether another attempt follows."""
    plan = script.get(name, "ok")
    if isinstance(plan, str):
        return plan, False
    return plan[attempt - 1], attempt < len(plan)


def drive(dag: Dag, script: Script | None = None) -> Run:
    script = script or {}
    states = {name: T.PENDING for name in dag.order}
    run = Run(states, JobState.PENDING)
    for _ in range(10 * len(dag.order) + 10):
        decision = evaluate(dag, states)
        run.decisions.append(decision)
        apply(states, decision)
        again = evaluate(dag, states)
        assert again.ready == again.skipped == again.upstream_failed == []
        assert again.job_state is decision.job_state
        if decision.job_state is not None:
            assert decision.ready == []
            assert all(s.is_terminal for s in states.values())
            run.job_state = decision.job_state
            return run
        assert decision.ready, f"deadlock at {states}"
        run.batches.append(list(decision.ready))
        for name in decision.ready:
            run.attempts[name] += 1
            result, more = outcome(script, name, run.attempts[name])
            if result == "ok":
                states[name] = T.SUCCEEDED
            else:
                states[name] = T.UP_FOR_RETRY if more else T.FAILED
    raise AssertionError("the run did not finish")


# --- fan-out / fan-in -------------------------------------------------------------------

FAN = (("a", ""), ("b", "a"), ("c", "a"), ("d", "a"), ("e", "b c d"))


def test_fan_out_fan_in_all_succeed() -> None:
    run = drive(dag_of(*FAN))
    assert run.batches == [["a"], ["b", "c", "d"], ["e"]]
    assert set(run.states.values()) == {T.SUCCEEDED}
    assert run.job_state is JobState.SUCCEEDED


def test_fan_in_after_one_branch_fails() -> None:
    run = drive(dag_of(*FAN), {"c": "fail"})
    assert run.batches == [["a"], ["b", "c", "d"]]
    assert run.states == {
        "a": T.SUCCEEDED,
        "b": T.SUCCEEDED,
        "c": T.FAILED,
        "d": T.SUCCEEDED,
        "e": T.UPSTREAM_FAILED,
    }
    assert run.job_state is JobState.FAILED


# --- upstream_failed cascades -----------------------------------------------------------


def test_failure_cascades_through_several_levels_in_one_call() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("c", "b"), ("d", "c"), ("e", "b d"), ("x", ""))
    states = {n: T.PENDING for n in dag.order} | {"a": T.FAILED, "x": T.RUNNING}
    decision = evaluate(dag, states)
    assert decision.upstream_failed == ["b", "c", "d", "e"]
    assert decision.ready == decision.skipped == []
    assert decision.job_state is None  # x still runs
    states |= dict.fromkeys(decision.upstream_failed, T.UPSTREAM_FAILED) | {"x": T.SUCCEEDED}
    final = evaluate(dag, states)
    assert final == Decision(job_state=JobState.FAILED)


def test_cascade_and_final_state_in_the_same_call() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("c", "b"))
    decision = evaluate(dag, {"a": T.FAILED, "b": T.PENDING, "c": T.PENDING})
    assert decision.upstream_failed == ["b", "c"]
    assert decision.job_state is JobState.FAILED


def test_driven_cascade() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("c", "b"), ("d", "c"))
    run = drive(dag, {"a": "fail"})
    assert run.ran == {"a"}
    assert run.decisions[1].upstream_failed == ["b", "c", "d"]
    assert run.states == {"a": T.FAILED} | dict.fromkeys("bcd", T.UPSTREAM_FAILED)
    assert run.job_state is JobState.FAILED


def test_cancelled_task_fails_its_all_success_downstream_and_the_job() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("c", ""))
    decision = evaluate(dag, {"a": T.CANCELLED, "b": T.PENDING, "c": T.SUCCEEDED})
    assert decision.upstream_failed == ["b"]
    assert decision.job_state is JobState.FAILED
    assert evaluate(dag, {"a": T.SUCCEEDED, "b": T.SUCCEEDED, "c": T.CANCELLED}).job_state is (
        JobState.FAILED
    )


# --- one_failed handlers and all_done cleanup -------------------------------------------

ETL = (
    ("extract", ""),
    ("transform", "extract"),
    ("load", "transform"),
    ("alert", "extract transform load", R.ONE_FAILED),
)


def test_one_failed_handler_runs_when_something_failed() -> None:
    run = drive(dag_of(*ETL), {"transform": "fail"})
    assert run.states == {
        "extract": T.SUCCEEDED,
        "transform": T.FAILED,
        "load": T.UPSTREAM_FAILED,
        "alert": T.SUCCEEDED,
    }
    assert "alert" in run.ran
    # alert is the only leaf (load feeds it) and it succeeded: Airflow calls that a success.
    assert run.job_state is JobState.SUCCEEDED


def test_one_failed_handler_beside_a_failed_leaf() -> None:
    dag = dag_of(*ETL[:3], ("alert", "extract transform", R.ONE_FAILED))
    run = drive(dag, {"transform": "fail"})
    assert run.states["alert"] is T.SUCCEEDED
    assert run.states["load"] is T.UPSTREAM_FAILED
    assert run.job_state is JobState.FAILED  # load is now a leaf


def test_one_failed_handler_fires_without_waiting_for_the_rest() -> None:
    dag = dag_of(("a", ""), ("b", ""), ("alert", "a b", R.ONE_FAILED))
    decision = evaluate(dag, {"a": T.FAILED, "b": T.RUNNING, "alert": T.PENDING})
    assert decision.ready == ["alert"]


def test_one_failed_handler_is_skipped_when_nothing_failed() -> None:
    run = drive(dag_of(*ETL))
    assert run.states["alert"] is T.SKIPPED
    assert "alert" not in run.ran
    assert run.job_state is JobState.SUCCEEDED


def test_failure_handled_by_a_one_failed_leaf_succeeds_the_job() -> None:
    dag = dag_of(("risky", ""), ("handler", "risky", R.ONE_FAILED))
    run = drive(dag, {"risky": "fail"})
    assert run.states == {"risky": T.FAILED, "handler": T.SUCCEEDED}
    assert run.job_state is JobState.SUCCEEDED  # only leaves count, as in Airflow


def test_failing_handler_fails_the_job() -> None:
    dag = dag_of(("risky", ""), ("handler", "risky", R.ONE_FAILED))
    run = drive(dag, {"risky": "fail", "handler": "fail"})
    assert run.job_state is JobState.FAILED


def test_all_done_cleanup_runs_after_a_failure() -> None:
    dag = dag_of(("setup", ""), ("work", "setup"), ("cleanup", "setup work", R.ALL_DONE))
    run = drive(dag, {"work": "fail"})
    assert run.batches == [["setup"], ["work"], ["cleanup"]]
    assert run.states == {"setup": T.SUCCEEDED, "work": T.FAILED, "cleanup": T.SUCCEEDED}
    assert run.job_state is JobState.SUCCEEDED  # cleanup is the only leaf


def test_all_done_cleanup_runs_after_upstream_failed_and_job_still_fails() -> None:
    dag = dag_of(
        ("setup", ""),
        ("work", "setup"),
        ("report", "work"),
        ("cleanup", "setup work report", R.ALL_DONE),
    )
    run = drive(dag, {"setup": "fail"})
    assert run.states == {
        "setup": T.FAILED,
        "work": T.UPSTREAM_FAILED,
        "report": T.UPSTREAM_FAILED,
        "cleanup": T.SUCCEEDED,
    }
    assert run.job_state is JobState.SUCCEEDED
    run = drive(dag_of(("w", ""), ("report", "w"), ("cleanup", "w", R.ALL_DONE)), {"w": "fail"})
    assert run.states["cleanup"] is T.SUCCEEDED
    assert run.job_state is JobState.FAILED  # report is a leaf, upstream_failed


def test_all_done_waits_for_running_upstreams() -> None:
    dag = dag_of(("a", ""), ("b", ""), ("cleanup", "a b", R.ALL_DONE))
    decision = evaluate(dag, {"a": T.FAILED, "b": T.RUNNING, "cleanup": T.PENDING})
    assert decision.is_empty


# --- skip cascades ----------------------------------------------------------------------


def test_skip_cascade() -> None:
    dag = dag_of(
        ("a", ""),
        ("on_fail", "a", R.ALL_FAILED),
        ("after", "on_fail"),
        ("later", "after"),
        ("join", "a after", R.NONE_FAILED),
        ("min_one", "a later", R.NONE_FAILED_MIN_ONE_SUCCESS),
        ("all_skipped", "on_fail later", R.NONE_FAILED_MIN_ONE_SUCCESS),
        ("any_ok", "after later", R.ONE_SUCCESS),
        ("any_bad", "after", R.ONE_FAILED),
        ("done", "later", R.ALL_DONE),
    )
    run = drive(dag)
    # one call after a succeeds skips the whole chain and readies everything that may run.
    skipped = {"on_fail", "after", "later", "all_skipped", "any_ok", "any_bad"}
    assert run.decisions[1].skipped == in_order(dag, skipped)
    assert run.decisions[1].ready == in_order(dag, {"join", "min_one", "done"})
    assert run.states == {
        "a": T.SUCCEEDED,
        "on_fail": T.SKIPPED,
        "after": T.SKIPPED,
        "later": T.SKIPPED,
        "join": T.SUCCEEDED,
        "min_one": T.SUCCEEDED,
        "all_skipped": T.SKIPPED,
        "any_ok": T.SKIPPED,
        "any_bad": T.SKIPPED,
        "done": T.SUCCEEDED,
    }
    assert run.ran == {"a", "join", "min_one", "done"}
    assert run.job_state is JobState.SUCCEEDED  # skipped leaves do not fail a job


def test_all_skipped_dag_succeeds() -> None:
    dag = dag_of(("a", ""), ("b", "a", R.ALL_FAILED), ("c", "b"))
    run = drive(dag)
    assert run.states == {"a": T.SUCCEEDED, "b": T.SKIPPED, "c": T.SKIPPED}
    assert run.job_state is JobState.SUCCEEDED


def test_failure_wins_over_skip_for_all_success() -> None:
    dag = dag_of(("a", ""), ("bad", ""), ("gate", "a", R.ALL_FAILED), ("t", "gate bad"))
    run = drive(dag, {"bad": "fail"})
    assert run.states["gate"] is T.SKIPPED
    assert run.states["t"] is T.UPSTREAM_FAILED
    assert run.job_state is JobState.FAILED


# --- every rule, driven, against succeeded / failed / skipped upstreams -----------------

RAN, SKIPPED, UPFAILED = T.SUCCEEDED, T.SKIPPED, T.UPSTREAM_FAILED
UPSTREAM_SETS = ("ok", "bad", "skp", "ok bad", "ok skp", "bad skp", "ok bad skp")
# The target's final state for each rule, in UPSTREAM_SETS order (Airflow 2).
EXPECTED: dict[TriggerRule, tuple[TaskState, ...]] = {
    R.ALL_SUCCESS: (RAN, UPFAILED, SKIPPED, UPFAILED, SKIPPED, UPFAILED, UPFAILED),
    R.ALL_DONE: (RAN, RAN, RAN, RAN, RAN, RAN, RAN),
    R.ALL_FAILED: (SKIPPED, RAN, SKIPPED, SKIPPED, SKIPPED, SKIPPED, SKIPPED),
    R.ONE_SUCCESS: (RAN, UPFAILED, SKIPPED, RAN, RAN, UPFAILED, RAN),
    R.ONE_FAILED: (SKIPPED, RAN, SKIPPED, RAN, SKIPPED, RAN, RAN),
    R.NONE_FAILED: (RAN, UPFAILED, RAN, UPFAILED, RAN, UPFAILED, UPFAILED),
    R.NONE_FAILED_MIN_ONE_SUCCESS: (RAN, UPFAILED, SKIPPED, UPFAILED, RAN, UPFAILED, UPFAILED),
    R.ALWAYS: (RAN, RAN, RAN, RAN, RAN, RAN, RAN),
}
CASES = [
    (rule, ups, want)
    for rule, wants in EXPECTED.items()
    for ups, want in zip(UPSTREAM_SETS, wants, strict=True)
]


@pytest.mark.parametrize(
    ("rule", "upstream", "expected"), CASES, ids=[f"{r.value}-{u}" for r, u, _ in CASES]
)
def test_every_rule_driven(rule: TriggerRule, upstream: str, expected: TaskState) -> None:
    # ok succeeds, bad fails, skp (all_failed on ok) is skipped; target has the rule.
    dag = dag_of(
        ("ok", ""),
        ("bad", ""),
        ("skp", "ok", R.ALL_FAILED),
        ("target", upstream, rule),
        ("after", "target", R.ALL_DONE),
    )
    run = drive(dag, {"bad": "fail"})
    assert run.states["ok"] is T.SUCCEEDED
    assert run.states["bad"] is T.FAILED
    assert run.states["skp"] is T.SKIPPED
    assert run.states["target"] is expected
    assert ("target" in run.ran) is (expected is RAN)
    assert run.states["after"] is T.SUCCEEDED
    # Leaves: after, and bad when target does not depend on it (skp when skipped is fine).
    bad_is_leaf = "bad" not in upstream.split()
    assert run.job_state is (JobState.FAILED if bad_is_leaf else JobState.SUCCEEDED)


def test_always_runs_before_its_upstreams_finish() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("watch", "a b", R.ALWAYS))
    run = drive(dag)
    assert run.batches == [["a", "watch"], ["b"]]
    assert run.job_state is JobState.SUCCEEDED


def test_one_success_fires_on_first_success() -> None:
    dag = dag_of(("a", ""), ("b", ""), ("c", ""), ("any", "a b c", R.ONE_SUCCESS))
    states = {"a": T.RUNNING, "b": T.SUCCEEDED, "c": T.FAILED, "any": T.PENDING}
    assert evaluate(dag, states).ready == ["any"]


# --- job final state --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("leaf_state", "job_state"),
    [
        (T.SUCCEEDED, JobState.SUCCEEDED),
        (T.SKIPPED, JobState.SUCCEEDED),
        (T.FAILED, JobState.FAILED),
        (T.UPSTREAM_FAILED, JobState.FAILED),
        (T.CANCELLED, JobState.FAILED),
    ],
)
def test_job_state_follows_the_leaves(leaf_state: TaskState, job_state: JobState) -> None:
    dag = dag_of(("root", ""), ("mid", "root"), ("leaf1", "mid"), ("leaf2", "mid", R.ALL_DONE))
    states = {"root": T.FAILED, "mid": T.FAILED, "leaf1": leaf_state, "leaf2": T.SUCCEEDED}
    assert evaluate(dag, states).job_state is job_state


@pytest.mark.parametrize("unfinished", [T.PENDING, T.QUEUED, T.RUNNING, T.UP_FOR_RETRY])
def test_no_job_state_while_a_task_is_unfinished(unfinished: TaskState) -> None:
    dag = dag_of(("a", ""), ("b", "", R.ALWAYS), ("c", "a"))
    decision = evaluate(dag, {"a": T.FAILED, "b": unfinished, "c": T.PENDING})
    assert decision.upstream_failed == ["c"]
    assert decision.job_state is None


def test_failed_non_leaf_does_not_fail_the_job_by_itself() -> None:
    dag = dag_of(("a", ""), ("b", "a", R.ALL_DONE))
    assert evaluate(dag, {"a": T.FAILED, "b": T.SUCCEEDED}).job_state is JobState.SUCCEEDED


# --- retries ----------------------------------------------------------------------------


def test_up_for_retry_waits_for_retry_at() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("alert", "a", R.ONE_FAILED))
    states = {"a": T.UP_FOR_RETRY, "b": T.PENDING, "alert": T.PENDING}
    retry_at = {"a": T0 + timedelta(seconds=30)}
    early = evaluate(dag, states, now=T0, retry_at=retry_at)
    # Not ready, and a retrying task is neither failed (alert waits) nor done (b waits).
    assert early.is_empty
    almost = evaluate(dag, states, now=T0 + timedelta(seconds=29.999), retry_at=retry_at)
    assert almost.is_empty
    assert evaluate(dag, states, now=T0 + timedelta(seconds=30), retry_at=retry_at).ready == ["a"]
    assert evaluate(dag, states, now=T0 + timedelta(minutes=5), retry_at=retry_at).ready == ["a"]


def test_up_for_retry_without_a_time_is_ready() -> None:
    dag = dag_of(("a", ""), ("b", ""))
    states = {"a": T.UP_FOR_RETRY, "b": T.UP_FOR_RETRY}
    assert evaluate(dag, states).ready == ["a", "b"]
    assert evaluate(dag, states, now=T0).ready == ["a", "b"]
    assert evaluate(dag, states, now=T0, retry_at={"a": None}).ready == ["a", "b"]
    later = {"b": T0 + timedelta(seconds=1)}
    assert evaluate(dag, states, now=T0, retry_at=later).ready == ["a"]


def test_retried_task_then_succeeds() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("alert", "a", R.ONE_FAILED))
    run = drive(dag, {"a": ["fail", "fail", "ok"]})
    assert run.attempts == Counter({"a": 3, "b": 1})
    assert run.states == {"a": T.SUCCEEDED, "b": T.SUCCEEDED, "alert": T.SKIPPED}
    assert run.job_state is JobState.SUCCEEDED


def test_retries_exhausted() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("alert", "a", R.ONE_FAILED))
    run = drive(dag, {"a": ["fail", "fail"]})
    assert run.attempts == Counter({"a": 2, "alert": 1})
    assert run.states == {"a": T.FAILED, "b": T.UPSTREAM_FAILED, "alert": T.SUCCEEDED}
    assert run.job_state is JobState.FAILED


# --- priority ---------------------------------------------------------------------------


def test_ready_list_is_highest_priority_first_ties_in_declaration_order() -> None:
    dag = Dag.from_nodes(
        [
            Node("a", ()),
            Node("b", (), priority=5),
            Node("c", ()),
            Node("d", (), priority=-1),
            Node("e", (), priority=5),
            Node("f", (), priority=1000),
        ]
    )
    ready = evaluate(dag, dict.fromkeys(dag.order, T.PENDING)).ready
    assert ready == ["f", "b", "e", "a", "c", "d"]


def test_priority_applies_across_pending_and_retrying_tasks() -> None:
    dag = Dag.from_nodes(
        [
            Node("a", ()),
            Node("b", ("a",), priority=1),
            Node("c", ("a",)),
            Node("r", (), priority=3),
            Node("s", (), priority=-3),
        ]
    )
    states = {"a": T.SUCCEEDED, "b": T.PENDING, "c": T.PENDING, "r": T.UP_FOR_RETRY}
    states["s"] = T.UP_FOR_RETRY
    assert evaluate(dag, states).ready == ["r", "b", "c", "s"]


def test_ready_ties_follow_topological_order() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("c", "b"), ("z", ""), ("y", "z"))
    states = dict.fromkeys(dag.order, T.UP_FOR_RETRY)
    ready = evaluate(dag, states).ready
    assert ready == [n for n in dag.order if n in ready]
    assert ready.index("a") < ready.index("b") < ready.index("c")
    assert ready.index("z") < ready.index("y")


# --- purity and idempotence -------------------------------------------------------------


def test_evaluate_is_idempotent_after_applying_its_decision() -> None:
    dag = dag_of(
        ("a", ""),
        ("b", "a"),
        ("c", "b"),
        ("gate", "a", R.ALL_FAILED),
        ("d", "gate"),
        ("e", "", R.ALWAYS),
        ("f", "a", R.ONE_FAILED),
    )
    states = dict.fromkeys(dag.order, T.PENDING) | {"a": T.FAILED}
    decision = evaluate(dag, states)
    assert decision.ready == in_order(dag, {"gate", "e", "f"})
    assert decision.upstream_failed == ["b", "c"]
    assert decision.skipped == []
    apply(states, decision)
    assert evaluate(dag, states).is_empty
    assert evaluate(dag, states).is_empty


def test_finished_job_keeps_its_state_on_reevaluation() -> None:
    dag = dag_of(("a", ""), ("b", "a"))
    states = {"a": T.FAILED, "b": T.PENDING}
    first = evaluate(dag, states)
    apply(states, first)
    second = evaluate(dag, states)
    assert second == Decision(job_state=JobState.FAILED)


def test_evaluate_does_not_modify_its_input() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("c", "b"))
    states = {"a": T.FAILED, "b": T.PENDING, "c": T.PENDING}
    snapshot = dict(states)
    evaluate(dag, states)
    assert states == snapshot


def test_queued_and_running_tasks_are_left_alone() -> None:
    dag = dag_of(("a", ""), ("b", "a"), ("c", "a"))
    states = {"a": T.FAILED, "b": T.QUEUED, "c": T.RUNNING}
    assert evaluate(dag, states).is_empty

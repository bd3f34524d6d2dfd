"""Property tests: random DAGs run to completion under random interleavings.

Each example draws a DAG (edges only from lower to higher index, so it is acyclic), a trigger
rule and a priority per task, and a script per task: how many attempts fail, how many retries
it has, whether it gets cancelled. The simulation then plays orchestrator and workers with a
random schedule: start some queued tasks, finish some running ones, let retry backoffs pass.
After every decision the whole decision is checked against an independent model of Airflow's
rules (``tests.dag.reference``), and at the end the run as a whole.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepflow.dag import Dag, Decision, JobState, Node, TaskState, TriggerRule, evaluate
from tests.dag.reference import LEAF_FAILURES, READY, SKIP, UPFAIL, WAIT, airflow_verdict

T = TaskState
T0 = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Script:
    retries: int
    """Attempts after the first one."""
    failures: int
    """How many attempts fail before one succeeds."""
    cancel: bool
    """The first attempt is cancelled instead."""

    def final_state(self) -> TaskState:
        if self.cancel:
            return T.CANCELLED
        return T.FAILED if self.failures > self.retries else T.SUCCEEDED


@dataclass(frozen=True)
class Case:
    dag: Dag
    scripts: dict[str, Script]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 25))
    nodes: list[Node] = []
    scripts: dict[str, Script] = {}
    for i in range(n):
        ups: list[int] = []
        if i:
            ups = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=min(i, 4)))
        name = f"t{i}"
        rule = draw(st.sampled_from(list(TriggerRule)))
        nodes.append(
            Node(name, tuple(f"t{j}" for j in sorted(ups)), rule, draw(st.integers(-2, 2)))
        )
        scripts[name] = Script(
            retries=draw(st.integers(0, 2)),
            failures=draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3])),
            cancel=draw(st.sampled_from([False] * 15 + [True])),
        )
    return Case(Dag.from_nodes(nodes), scripts)


@dataclass
class Sim:
    dag: Dag
    scripts: dict[str, Script]
    rng: random.Random
    states: dict[str, TaskState] = field(init=False)
    retry_at: dict[str, datetime] = field(default_factory=dict)
    now: datetime = T0
    attempts: Counter[str] = field(default_factory=Counter)
    decided: dict[str, TaskState] = field(default_factory=dict)
    """Tasks evaluate marked skipped or upstream_failed, with the state it gave them."""
    job_state: JobState | None = None

    def __post_init__(self) -> None:
        self.states = dict.fromkeys(self.dag.order, T.PENDING)

    def upstream_states(self, name: str) -> list[TaskState]:
        return [self.states[u] for u in self.dag.tasks[name].upstream]

    # --- one evaluate call, checked -----------------------------------------------------

    def evaluate(self) -> Decision:
        before = dict(self.states)
        decision = evaluate(self.dag, self.states, now=self.now, retry_at=self.retry_at)
        assert self.states == before, "evaluate changed its input"
        self.check_decision(decision)
        for name in decision.skipped:
            self.states[name] = T.SKIPPED
            self.decided[name] = T.SKIPPED
        for name in decision.upstream_failed:
            self.states[name] = T.UPSTREAM_FAILED
            self.decided[name] = T.UPSTREAM_FAILED
        for name in decision.ready:
            self.states[name] = T.QUEUED
        again = evaluate(self.dag, self.states, now=self.now, retry_at=self.retry_at)
        assert again.ready == again.skipped == again.upstream_failed == []
        assert again.job_state is decision.job_state
        return decision

    def check_decision(self, decision: Decision) -> None:
        ready, skipped, upfailed = decision.ready, decision.skipped, decision.upstream_failed
        assert len(set(ready) | set(skipped) | set(upfailed)) == len(ready + skipped + upfailed)
        # After the decision's skips and upstream failures, each pending task's rule gives
        # exactly what the decision says: the cascade is complete and nothing is early.
        after = dict(self.states)
        after |= dict.fromkeys(skipped, T.SKIPPED) | dict.fromkeys(upfailed, T.UPSTREAM_FAILED)
        for name in self.dag.order:
            state = self.states[name]
            if state is T.PENDING:
                node = self.dag.tasks[name]
                want = airflow_verdict(node.trigger_rule, (after[u] for u in node.upstream))
                got = (
                    READY
                    if name in ready
                    else SKIP
                    if name in skipped
                    else UPFAIL
                    if name in upfailed
                    else WAIT
                )
                assert got is want, (name, node, [after[u] for u in node.upstream])
            elif state is T.UP_FOR_RETRY:
                due = self.retry_at[name] <= self.now
                assert (name in ready) is due, (name, self.retry_at[name], self.now)
            else:
                assert name not in ready + skipped + upfailed, (name, state)
        # Highest priority first; ties in topological order.
        position = {n: i for i, n in enumerate(self.dag.order)}
        keys = [(-self.dag.tasks[n].priority, position[n]) for n in ready]
        assert keys == sorted(keys)
        # The job's state, once every task is terminal, by the leaf rule.
        if all(s.is_terminal for s in after.values()):
            failed = any(after[leaf] in LEAF_FAILURES for leaf in self.dag.leaves)
            assert decision.job_state is (JobState.FAILED if failed else JobState.SUCCEEDED)
        else:
            assert decision.job_state is None

    # --- workers --------------------------------------------------------------------------

    def start(self, name: str) -> None:
        assert self.states[name] is T.QUEUED
        # The rule still allows it now, whatever its upstreams did since it was queued.
        node = self.dag.tasks[name]
        assert airflow_verdict(node.trigger_rule, self.upstream_states(name)) is READY, name
        self.states[name] = T.RUNNING
        self.attempts[name] += 1

    def finish(self, name: str) -> None:
        assert self.states[name] is T.RUNNING
        script, attempt = self.scripts[name], self.attempts[name]
        if script.cancel:
            self.states[name] = T.CANCELLED
        elif attempt > script.failures:
            self.states[name] = T.SUCCEEDED
        elif attempt <= script.retries:
            self.states[name] = T.UP_FOR_RETRY
            self.retry_at[name] = self.now + timedelta(seconds=self.rng.choice([0, 1, 5, 30]))
        else:
            self.states[name] = T.FAILED

    def step(self) -> None:
        queued = [n for n in self.dag.order if self.states[n] is T.QUEUED]
        running = [n for n in self.dag.order if self.states[n] is T.RUNNING]
        if not queued and not running:
            waiting = [n for n in self.dag.order if self.states[n] is T.UP_FOR_RETRY]
            assert waiting, f"stuck with nothing to do: {self.states}"
            self.now = max(self.now, min(self.retry_at[n] for n in waiting))
            return
        if queued and (not running or self.rng.random() < 0.5):
            for name in self.rng.sample(queued, self.rng.randint(1, len(queued))):
                self.start(name)
        else:
            chosen = self.rng.sample(running, self.rng.randint(1, len(running)))
            for name in chosen:  # in random order, no evaluate in between
                self.finish(name)
        self.now += timedelta(seconds=self.rng.choice([0, 0, 1, 3]))

    def run(self) -> None:
        max_attempts = sum(1 + s.retries for s in self.scripts.values())
        for _ in range(4 * max_attempts + 2 * len(self.dag.order) + 10):
            decision = self.evaluate()
            if decision.job_state is not None:
                self.job_state = decision.job_state
                return
            self.step()
        raise AssertionError("the run did not finish")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), rng=st.randoms(use_true_random=False))
def test_random_dags_run_to_a_consistent_end(case: Case, rng: random.Random) -> None:
    sim = Sim(case.dag, case.scripts, rng)
    sim.run()
    states = sim.states

    assert all(s.is_terminal for s in states.values()), states
    ran = set(sim.attempts)
    for name, state in states.items():
        script = case.scripts[name]
        if name in sim.decided:
            assert name not in ran, f"{name} ran but was marked {state}"
            assert state is sim.decided[name]
        else:
            assert name in ran, f"{name} ended {state} without running"
            assert state is script.final_state(), (name, script)
            expected_attempts = 1 if script.cancel else min(script.failures, script.retries) + 1
            assert sim.attempts[name] == expected_attempts

    # Judged again on the final states, each task's rule agrees with its fate. The one
    # exception is Airflow's too: all_success gives up as "skipped" at the first skipped
    # upstream, even if another upstream fails later.
    for name in case.dag.order:
        node = case.dag.tasks[name]
        ups = [states[u] for u in node.upstream]
        verdict = airflow_verdict(node.trigger_rule, ups)
        if name in ran:
            assert verdict is READY, (name, node, ups)
        elif states[name] is T.SKIPPED:
            late_failure = node.trigger_rule is TriggerRule.ALL_SUCCESS and T.SKIPPED in ups
            assert verdict is SKIP or (verdict is UPFAIL and late_failure), (name, node, ups)
        else:
            assert verdict is UPFAIL, (name, node, ups)

    leaf_failed = any(states[leaf] in LEAF_FAILURES for leaf in case.dag.leaves)
    assert sim.job_state is (JobState.FAILED if leaf_failed else JobState.SUCCEEDED)


@settings(max_examples=200, deadline=None)
@given(case=cases())
def test_leaves_and_order(case: Case) -> None:
    dag = case.dag
    assert sorted(dag.order) == sorted(dag.tasks)
    position = {n: i for i, n in enumerate(dag.order)}
    for name, node in dag.tasks.items():
        assert all(position[u] < position[name] for u in node.upstream)
    has_downstream = {u for node in dag.tasks.values() for u in node.upstream}
    assert set(dag.leaves) == set(dag.tasks) - has_downstream
    assert list(dag.leaves) == [n for n in dag.order if n in dag.leaves]
    for name in dag.order:
        assert dag.downstream(name) == [n for n in dag.order if name in dag.tasks[n].upstream]


@settings(max_examples=200, deadline=None)
@given(case=cases(), data=st.data())
def test_evaluate_on_arbitrary_states_is_a_fixpoint(case: Case, data: st.DataObject) -> None:
    """From any mix of task states (not only reachable ones), applying one decision leaves
    nothing for a second call to decide."""
    dag = case.dag
    states = {n: data.draw(st.sampled_from(list(TaskState)), label=n) for n in dag.order}
    decision = evaluate(dag, states)
    states |= dict.fromkeys(decision.skipped, T.SKIPPED)
    states |= dict.fromkeys(decision.upstream_failed, T.UPSTREAM_FAILED)
    states |= dict.fromkeys(decision.ready, T.QUEUED)
    again = evaluate(dag, states)
    assert again.ready == again.skipped == again.upstream_failed == []
    assert again.job_state is decision.job_state

"""Trigger rules against Airflow 2's semantics, case by case and exhaustively.

Upstream states are written as strings, one letter per upstream task:
S succeeded, F failed, K skipped, U upstream_failed, C cancelled,
P pending, Q queued, R running, Y up_for_retry.
"""

from __future__ import annotations

import itertools

import pytest

from deepflow.dag import TERMINAL_TASK_STATES, TaskState, TriggerRule
from deepflow.dag.trigger_rules import UpstreamCounts, Verdict, judge
from tests.dag.reference import READY, SKIP, UPFAIL, WAIT, airflow_verdict

LETTERS: dict[str, TaskState] = {
    "S": TaskState.SUCCEEDED,
    "F": TaskState.FAILED,
    "K": TaskState.SKIPPED,
    "U": TaskState.UPSTREAM_FAILED,
    "C": TaskState.CANCELLED,
    "P": TaskState.PENDING,
    "Q": TaskState.QUEUED,
    "R": TaskState.RUNNING,
    "Y": TaskState.UP_FOR_RETRY,
}

R = TriggerRule

# (rule, upstream states, verdict) -- Airflow 2's documented behaviour.
TABLE: list[tuple[TriggerRule, str, Verdict]] = [
    # all_success: upstream_failed on the first failure, skipped on the first skip
    # (a failure wins over a skip), ready when every upstream succeeded.
    (R.ALL_SUCCESS, "", READY),
    (R.ALL_SUCCESS, "P", WAIT),
    (R.ALL_SUCCESS, "Q", WAIT),
    (R.ALL_SUCCESS, "R", WAIT),
    (R.ALL_SUCCESS, "RR", WAIT),
    (R.ALL_SUCCESS, "Y", WAIT),
    (R.ALL_SUCCESS, "SR", WAIT),
    (R.ALL_SUCCESS, "SSY", WAIT),
    (R.ALL_SUCCESS, "S", READY),
    (R.ALL_SUCCESS, "SSS", READY),
    (R.ALL_SUCCESS, "F", UPFAIL),
    (R.ALL_SUCCESS, "FR", UPFAIL),
    (R.ALL_SUCCESS, "SF", UPFAIL),
    (R.ALL_SUCCESS, "U", UPFAIL),
    (R.ALL_SUCCESS, "SUP", UPFAIL),
    (R.ALL_SUCCESS, "C", UPFAIL),
    (R.ALL_SUCCESS, "K", SKIP),
    (R.ALL_SUCCESS, "KR", SKIP),
    (R.ALL_SUCCESS, "SK", SKIP),
    (R.ALL_SUCCESS, "KKK", SKIP),
    (R.ALL_SUCCESS, "FK", UPFAIL),
    (R.ALL_SUCCESS, "KUR", UPFAIL),
    # all_done: ready once every upstream is terminal, whatever it ended as.
    (R.ALL_DONE, "", READY),
    (R.ALL_DONE, "R", WAIT),
    (R.ALL_DONE, "P", WAIT),
    (R.ALL_DONE, "Y", WAIT),
    (R.ALL_DONE, "SR", WAIT),
    (R.ALL_DONE, "FQ", WAIT),
    (R.ALL_DONE, "KKY", WAIT),
    (R.ALL_DONE, "S", READY),
    (R.ALL_DONE, "F", READY),
    (R.ALL_DONE, "K", READY),
    (R.ALL_DONE, "U", READY),
    (R.ALL_DONE, "C", READY),
    (R.ALL_DONE, "FF", READY),
    (R.ALL_DONE, "KK", READY),
    (R.ALL_DONE, "SFKUC", READY),
    # all_failed: skipped as soon as any upstream succeeded or was skipped; ready when
    # every upstream failed (upstream_failed counts as failed).
    (R.ALL_FAILED, "", READY),
    (R.ALL_FAILED, "R", WAIT),
    (R.ALL_FAILED, "FR", WAIT),
    (R.ALL_FAILED, "FY", WAIT),
    (R.ALL_FAILED, "UP", WAIT),
    (R.ALL_FAILED, "F", READY),
    (R.ALL_FAILED, "FF", READY),
    (R.ALL_FAILED, "U", READY),
    (R.ALL_FAILED, "FU", READY),
    (R.ALL_FAILED, "C", READY),
    (R.ALL_FAILED, "FUC", READY),
    (R.ALL_FAILED, "S", SKIP),
    (R.ALL_FAILED, "SR", SKIP),
    (R.ALL_FAILED, "FS", SKIP),
    (R.ALL_FAILED, "K", SKIP),
    (R.ALL_FAILED, "KR", SKIP),
    (R.ALL_FAILED, "FK", SKIP),
    (R.ALL_FAILED, "FFFK", SKIP),
    # one_success: fires on the first success; once all are done with none succeeded,
    # skipped if all were skipped, else upstream_failed.
    (R.ONE_SUCCESS, "", READY),
    (R.ONE_SUCCESS, "R", WAIT),
    (R.ONE_SUCCESS, "RR", WAIT),
    (R.ONE_SUCCESS, "FR", WAIT),
    (R.ONE_SUCCESS, "KR", WAIT),
    (R.ONE_SUCCESS, "FY", WAIT),
    (R.ONE_SUCCESS, "KKP", WAIT),
    (R.ONE_SUCCESS, "S", READY),
    (R.ONE_SUCCESS, "SR", READY),
    (R.ONE_SUCCESS, "RRS", READY),
    (R.ONE_SUCCESS, "SF", READY),
    (R.ONE_SUCCESS, "SK", READY),
    (R.ONE_SUCCESS, "SUCY", READY),
    (R.ONE_SUCCESS, "K", SKIP),
    (R.ONE_SUCCESS, "KK", SKIP),
    (R.ONE_SUCCESS, "F", UPFAIL),
    (R.ONE_SUCCESS, "FF", UPFAIL),
    (R.ONE_SUCCESS, "U", UPFAIL),
    (R.ONE_SUCCESS, "C", UPFAIL),
    (R.ONE_SUCCESS, "FK", UPFAIL),
    (R.ONE_SUCCESS, "KKU", UPFAIL),
    # one_failed: fires on the first failure (upstream_failed counts); skipped once all
    # are done without one.
    (R.ONE_FAILED, "", READY),
    (R.ONE_FAILED, "R", WAIT),
    (R.ONE_FAILED, "SR", WAIT),
    (R.ONE_FAILED, "KR", WAIT),
    (R.ONE_FAILED, "SY", WAIT),
    (R.ONE_FAILED, "Y", WAIT),
    (R.ONE_FAILED, "F", READY),
    (R.ONE_FAILED, "FR", READY),
    (R.ONE_FAILED, "RRF", READY),
    (R.ONE_FAILED, "U", READY),
    (R.ONE_FAILED, "UR", READY),
    (R.ONE_FAILED, "C", READY),
    (R.ONE_FAILED, "SF", READY),
    (R.ONE_FAILED, "KF", READY),
    (R.ONE_FAILED, "S", SKIP),
    (R.ONE_FAILED, "SS", SKIP),
    (R.ONE_FAILED, "K", SKIP),
    (R.ONE_FAILED, "SK", SKIP),
    # none_failed: upstream_failed on any failure, else ready once all are done (skips ok).
    (R.NONE_FAILED, "", READY),
    (R.NONE_FAILED, "R", WAIT),
    (R.NONE_FAILED, "SR", WAIT),
    (R.NONE_FAILED, "KR", WAIT),
    (R.NONE_FAILED, "SY", WAIT),
    (R.NONE_FAILED, "S", READY),
    (R.NONE_FAILED, "K", READY),
    (R.NONE_FAILED, "KK", READY),
    (R.NONE_FAILED, "SK", READY),
    (R.NONE_FAILED, "F", UPFAIL),
    (R.NONE_FAILED, "FR", UPFAIL),
    (R.NONE_FAILED, "U", UPFAIL),
    (R.NONE_FAILED, "C", UPFAIL),
    (R.NONE_FAILED, "SKF", UPFAIL),
    # none_failed_min_one_success: as none_failed, but skipped when every upstream skipped.
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "", READY),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "R", WAIT),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "SR", WAIT),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "KR", WAIT),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "KKY", WAIT),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "S", READY),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "SK", READY),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "KSK", READY),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "K", SKIP),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "KK", SKIP),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "F", UPFAIL),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "FR", UPFAIL),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "KF", UPFAIL),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "U", UPFAIL),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "C", UPFAIL),
    (R.NONE_FAILED_MIN_ONE_SUCCESS, "SKU", UPFAIL),
    # always: ready immediately, whatever its upstreams are doing.
    (R.ALWAYS, "", READY),
    (R.ALWAYS, "P", READY),
    (R.ALWAYS, "PP", READY),
    (R.ALWAYS, "R", READY),
    (R.ALWAYS, "Y", READY),
    (R.ALWAYS, "F", READY),
    (R.ALWAYS, "K", READY),
    (R.ALWAYS, "U", READY),
    (R.ALWAYS, "SFKUCPQRY", READY),
]


def states_of(letters: str) -> list[TaskState]:
    return [LETTERS[c] for c in letters]


def verdict(rule: TriggerRule, letters: str) -> Verdict:
    return judge(rule, UpstreamCounts.of(states_of(letters)))


@pytest.mark.parametrize(
    ("rule", "upstream", "expected"),
    TABLE,
    ids=[f"{rule.value}-[{ups}]" for rule, ups, _ in TABLE],
)
def test_rule_table(rule: TriggerRule, upstream: str, expected: Verdict) -> None:
    assert verdict(rule, upstream) is expected


def test_table_covers_every_rule() -> None:
    assert {rule for rule, _, _ in TABLE} == set(TriggerRule)
    for rule in TriggerRule:
        seen = {expected for r, _, expected in TABLE if r is rule}
        possible = {READY} if rule in (R.ALL_DONE, R.ALWAYS) else {READY, WAIT}
        assert possible <= seen, rule


@pytest.mark.parametrize("rule", list(TriggerRule))
def test_no_upstream_is_ready_for_every_rule(rule: TriggerRule) -> None:
    assert judge(rule, UpstreamCounts.of([])) is READY


@pytest.mark.parametrize("rule", list(TriggerRule))
def test_order_of_upstreams_does_not_matter(rule: TriggerRule) -> None:
    for letters in ("SFK", "KRU", "SSKC", "FYR"):
        verdicts = {verdict(rule, "".join(p)) for p in itertools.permutations(letters)}
        assert len(verdicts) == 1, (rule, letters, verdicts)


def _multisets(max_size: int) -> list[str]:
    return [
        "".join(combo)
        for size in range(max_size + 1)
        for combo in itertools.combinations_with_replacement(LETTERS, size)
    ]


@pytest.mark.parametrize("rule", list(TriggerRule))
def test_every_combination_matches_airflow(rule: TriggerRule) -> None:
    """Every multiset of up to four upstream states, against the reference model."""
    wrong = []
    for letters in _multisets(4):
        got, want = verdict(rule, letters), airflow_verdict(rule, states_of(letters))
        if got is not want:
            wrong.append((letters, got, want))
    assert wrong == []


@pytest.mark.parametrize("rule", list(TriggerRule))
def test_ready_is_stable_as_upstreams_finish(rule: TriggerRule) -> None:
    """Once a rule fires, upstreams finishing (in any terminal state) never take it back:
    the orchestrator may queue a task and start it later."""
    terminal = [c for c, s in LETTERS.items() if s in TERMINAL_TASK_STATES]
    for letters in _multisets(3):
        if verdict(rule, letters) is not READY:
            continue
        for i, c in enumerate(letters):
            if LETTERS[c] in TERMINAL_TASK_STATES:
                continue
            for t in terminal:
                later = letters[:i] + t + letters[i + 1 :]
                assert verdict(rule, later) is READY, (rule, letters, later)


@pytest.mark.parametrize("rule", list(TriggerRule))
def test_all_terminal_upstreams_never_wait(rule: TriggerRule) -> None:
    """With every upstream finished, each rule decides: a DAG can never deadlock."""
    terminal = "SFKUC"
    for size in range(1, 5):
        for combo in itertools.combinations_with_replacement(terminal, size):
            assert verdict(rule, "".join(combo)) is not WAIT, (rule, combo)


def test_upstream_counts() -> None:
    counts = UpstreamCounts.of(states_of("SSFKUCPRY"))
    assert counts == UpstreamCounts(total=9, succeeded=2, skipped=1, failed=3, done=6)
    assert not counts.all_done
    assert UpstreamCounts.of(states_of("SFK")).all_done
    assert UpstreamCounts.of([]).all_done


def test_rule_names_are_airflows() -> None:
    assert {r.value for r in TriggerRule} == {
        "all_success",
        "all_done",
        "all_failed",
        "one_success",
        "one_failed",
        "none_failed",
        "none_failed_min_one_success",
        "always",
    }
    assert TriggerRule("none_failed_min_one_success") is R.NONE_FAILED_MIN_ONE_SUCCESS

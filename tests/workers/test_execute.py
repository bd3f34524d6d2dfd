"""execute_task on real PostgreSQL: operators run in an attempt process that the worker can
always stop, inside C code too; outcomes, logs and the process's lifetime as reported."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from deepflow import dag
from deepflow.config import Settings
from deepflow.dag.operators import OperatorFailed
from deepflow.procutil import signal_alive, wait_gone
from deepflow.store import (
    Database,
    Task,
    cancel_job,
    create_job,
    ensure_tenant,
    get_database,
    queue_task,
)
from deepflow.store.logs import read_task_logs
from deepflow.workers import attempt_process
from deepflow.workers.execute import StaleAttempt, execute_task
from tests.workers.stop_operators import read_pid  # importing registers the test operators

pytestmark = pytest.mark.timeout(120)

STOP_WITHIN_S = 5.0


@pytest.fixture
def settings(pg_url: str) -> Iterator[Settings]:
    yield dataclasses.replace(Settings.from_env(), database_url=pg_url, lease_ttl_s=3.0)
    attempt_process.release()  # each test starts with a fresh attempt process


@pytest.fixture
def db(settings: Settings) -> Database:
    return get_database(settings.database_url)


def _queue(db: Database, task: dict[str, Any], upstream: dict[str, Any] | None = None) -> Task:
    """A one-task job (two with ``upstream``, already succeeded) whose task is queued."""
    tasks = [task] if upstream is None else [upstream, {**task, "depends_on": [upstream["name"]]}]
    with db.transaction() as s:
        tenant = ensure_tenant(s, "acme")
        job, _ = create_job(s, tenant.id, dag.plan("dag", {"tasks": tasks}), "dag")
        rows = {t.name: t for t in job.tasks}
        if upstream is not None:
            first = rows[upstream["name"]]
            first.state, first.output = dag.TaskState.SUCCEEDED, {"made": "upstream"}
        return queue_task(s, rows[task["name"]].id)


def _task(db: Database, task_id: str) -> Task:
    with db.transaction() as s:
        row = s.get(Task, task_id)
        assert row is not None
        s.expunge(row)
        return row


def _log(db: Database, task: Task) -> Any:
    with db.transaction() as s:
        name = s.get(Task, task.id).name  # type: ignore[union-attr]
        return read_task_logs(s, task.tenant_id, task.job_id, name)[-1]



def test_output_and_everything_the_attempt_writes_come_back(db: Database, settings: Settings):
    task = _queue(db, {"name": "r", "operator": "test.report", "args": {"tag": "one"}})
    output = execute_task(task.id, task.attempt, settings)
    assert output["pid"] != os.getpid()
    assert _task(db, task.id).state is dag.TaskState.SUCCEEDED
    log = _log(db, task)
    assert log.outcome == "succeeded"
    for line in ("print from one", "WARNING stop_operators: record from one"):
        assert line in log.text
    assert "fd write from one" in log.text and "child process output" in log.text


def test_attempts_of_a_thread_share_a_process_until_one_is_stopped(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    first, second = (
        _queue(db, {"name": "r", "operator": "test.report", "args": {"tag": tag}})
        for tag in ("a", "b")
    )
    pid = execute_task(first.id, first.attempt, settings)["pid"]
    assert execute_task(second.id, second.attempt, settings)["pid"] == pid
    assert "print from a" not in _log(db, second).text  # each attempt's log is its own

    slow = _queue(
        db,
        {"name": "s", "operator": "test.c_sleep", "timeout_s": 1,
         "args": {"seconds": 60, "pid_path": str(tmp_path / "pid")}},
    )  # fmt: skip
    with pytest.raises(StaleAttempt):
        execute_task(slow.id, slow.attempt, settings)
    assert not signal_alive(pid)
    third = _queue(db, {"name": "r", "operator": "test.report", "args": {"tag": "c"}})
    assert execute_task(third.id, third.attempt, settings)["pid"] != pid


def test_failure_raises_the_operators_exception_with_its_log(db: Database, settings: Settings):
    task = _queue(db, {"name": "f", "operator": "test.report", "args": {"tag": "x", "fail": 1}})
    with pytest.raises(OperatorFailed, match="planned failure of x") as raised:
        execute_task(task.id, task.attempt, settings)
    assert any("In the attempt process" in note for note in raised.value.__notes__)
    row = _task(db, task.id)
    assert row.state is dag.TaskState.FAILED
    assert row.error == "OperatorFailed: planned failure of x"
    log = _log(db, task)
    assert log.outcome == "failed" and "print from x" in log.text
    assert "Traceback" in log.text and "OperatorFailed: planned failure of x" in log.text


@pytest.mark.parametrize(
    ("operator", "error"),
    [
        ("test.die", "AttemptDied: the attempt process was killed by SIGKILL"),
        ("test.exit", "SystemExit: 3"),
        ("test.unpicklable", "TypeError: the output cannot be sent back"),
    ],
)
def test_an_attempt_that_breaks_its_process_or_protocol_fails(
    db: Database, settings: Settings, operator: str, error: str
) -> None:
    task = _queue(db, {"name": "d", "operator": operator})
    with pytest.raises(OperatorFailed if operator == "test.die" else Exception):
        execute_task(task.id, task.attempt, settings)
    row = _task(db, task.id)
    assert row.state is dag.TaskState.FAILED and row.error is not None
    assert row.error.startswith(error), row.error
    after = _queue(db, {"name": "r", "operator": "test.report", "args": {"tag": "next"}})
    assert execute_task(after.id, after.attempt, settings)["pid"]  # the next one still runs


def test_a_timeout_stops_an_operator_in_c_code_even_if_it_ignores_sigterm(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    args = {"seconds": 60, "pid_path": str(tmp_path / "pid"), "ignore_sigterm": True}
    task = _queue(db, {"name": "t", "operator": "test.c_sleep", "timeout_s": 2, "args": args})
    start = time.monotonic()
    with pytest.raises(StaleAttempt, match="timed out"):
        execute_task(task.id, task.attempt, settings)
    assert time.monotonic() - start < 2 + STOP_WITHIN_S
    assert not signal_alive(int((tmp_path / "pid").read_text()))
    row = _task(db, task.id)
    assert row.state is dag.TaskState.FAILED
    assert row.error is not None and row.error.startswith("timed out after its deadline")
    assert "attempt stopped: timed out" in _log(db, task).text


def test_cancelling_the_job_stops_the_attempt_and_its_group_not_other_sessions(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    args = {
        "seconds": 60,
        "pid_path": str(tmp_path / "pid"),
        "children_path": str(tmp_path / "children"),
    }
    task = _queue(db, {"name": "c", "operator": "test.c_sleep", "args": args})
    raised: list[BaseException] = []

    def attempt() -> None:
        try:
            execute_task(task.id, task.attempt, settings)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=attempt)
    thread.start()
    pid = read_pid(tmp_path / "pid", 30)
    grouped, detached = map(int, (tmp_path / "children").read_text().split())
    try:
        with db.transaction() as s:
            cancel_job(s, task.tenant_id, task.job_id)
        cancelled = time.monotonic()
        assert wait_gone(pid, STOP_WITHIN_S), "the attempt process outlived the cancellation"
        assert wait_gone(grouped, STOP_WITHIN_S - (time.monotonic() - cancelled))
        thread.join(STOP_WITHIN_S)
        assert not thread.is_alive()
        assert isinstance(raised[0], StaleAttempt) and "lease lost" in str(raised[0])
        assert signal_alive(detached), "a process in its own session must outlive the attempt"
        assert _task(db, task.id).state is dag.TaskState.CANCELLED
        assert "attempt stopped: lease lost" in _log(db, task).text
    finally:
        os.kill(detached, 9)


def test_context_and_the_store_work_inside_the_attempt(db: Database, settings: Settings):
    upstream = {"name": "up", "operator": "noop"}
    task = _queue(db, {"name": "ctx", "operator": "test.report_context"}, upstream)
    context = execute_task(task.id, task.attempt, settings)["context"]
    assert context["upstream"] == {"up": {"made": "upstream"}}

    url = settings.database_url
    task = _queue(db, {"name": "q", "operator": "test.query", "args": {"database_url": url}})
    backend = execute_task(task.id, task.attempt, settings)["backend_pid"]
    with get_database(url).transaction() as s:  # the worker's connections are still its own
        assert s.execute(text("SELECT pg_backend_pid()")).scalar_one() != backend

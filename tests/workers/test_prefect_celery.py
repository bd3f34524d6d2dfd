"""CeleryTaskRunner end to end: a real Prefect server, real Celery workers.

On Redis, worker "a" serves the default queue (prefork, 2 processes) and worker "b" the queue
"gpu" (1 process, so a second message for it waits in Redis); worker "files" runs on kombu's
filesystem transport with file results (the platform's embedded default). A task reports the
parent PID of the process that ran it: the PID of the worker that ran it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import redis
from celery import Celery
from prefect import flow, tags, task
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType, TaskRun
from prefect.exceptions import CancelledRun, ObjectNotFound
from prefect.futures import PrefectConcurrentFuture, as_completed, wait
from prefect.states import State

from deepflow.workers.prefect_celery import TASK_NAME, CeleryTaskRunner, register_task
from tests.workers.conftest import prefect_env
from tests.workers.prefect_celery_app import REDIS_URL, app, make_files_app

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
RUN = uuid.uuid4().hex[:8]
WORKERS = {  # name: (queue, concurrency)
    f"a-{RUN}@test": ("celery", 2),
    f"b-{RUN}@test": ("gpu", 1),
}
FILES_WORKER = f"files-{RUN}@test"
GPU = {"queue:gpu"}


# ---- Prefect tasks and flows: pickled into each message (a worker may import this module) ----


@task
def where() -> dict[str, Any]:
    from celery import current_task  # looked up on the worker, not pickled with the task

    request = current_task.request
    return {
        "pid": os.getpid(),
        "worker_pid": os.getppid(),
        "celery_id": request.id,
        "priority": request.delivery_info.get("priority"),
    }


@task
def square(x: int) -> int:
    return x * x


@task
def total(xs: list[int]) -> int:
    return sum(xs)


@task
def boom(message: str) -> None:
    raise KeyError(message)


@task
async def async_where(delay: float) -> int:
    await asyncio.sleep(delay)
    return os.getppid()


@task
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task
def die_once(marker: str) -> str:
    """Kills its worker process on the first delivery: Celery redelivers the message."""
    if not Path(marker).exists():
        Path(marker).write_text("died")
        os._exit(1)
    return "second delivery"


@task
def touch(path: str) -> str:
    Path(path).write_text("ran")
    return path


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_env(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = prefect_env(prefect_server, tmp_path_factory.mktemp("worker-home"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "platform")])
    return env


@pytest.fixture(scope="module")
def files_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Broker folders and result files of the filesystem-transport worker."""
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def workers(
    worker_env: dict[str, str], files_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, int]]:
    """Start all workers at once (Redis db flushed); yields queue name -> worker PID."""
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    logs = tmp_path_factory.mktemp("celery")
    files_env = worker_env | {"PREFECT_CELERY_TEST_FILES": str(files_root)}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, (queue, concurrency) in WORKERS.items():
            processes[queue] = _start_worker("app", name, queue, concurrency, worker_env, logs)
        processes["files"] = _start_worker("files_app", FILES_WORKER, "files", 1, files_env, logs)
        _until(lambda: len(app.control.ping(list(WORKERS), timeout=0.5)) == len(WORKERS), 60)
        files = make_files_app(files_root)
        _until(lambda: files.control.ping([FILES_WORKER], timeout=0.5), 60)
        yield {queue: process.pid for queue, process in processes.items()}
    finally:
        _stop(list(processes.values()))
        store.flushdb()


def _start_worker(
    app_name: str, name: str, queue: str, concurrency: int, env: dict[str, str], logs: Path
) -> subprocess.Popen[bytes]:
    celery_bin = Path(sys.executable).with_name("celery")
    log = (logs / f"{name.split('@')[0]}.log").open("wb")
    return subprocess.Popen(
        [str(celery_bin), "-A", f"tests.workers.prefect_celery_app:{app_name}", "worker",
         "-Q", queue, "-n", name, "--pool", "prefork", "--concurrency", str(concurrency),
         "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Cold shutdown (nothing runs by now) for all at once, then SIGKILL what is left."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGQUIT)
    deadline = time.monotonic() + 15
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(deadline - time.monotonic(), 0.1))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its pool processes too, if any linger


def _until(check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if value := check():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(interval)


def _task_runs(flow_run_id: uuid.UUID) -> dict[uuid.UUID, TaskRun]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.id: run for run in runs}


def _api_state(task_run_id: uuid.UUID) -> StateType | None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        try:
            run = client.read_task_run(task_run_id)
        except ObjectNotFound:
            return None
    return run.state.type if run.state else None


def _final_task_states(flow_run_id: uuid.UUID, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Task-run states reach the API as events, a little after the flow sees them: poll."""

    def read() -> dict[uuid.UUID, str] | None:
        runs = _task_runs(flow_run_id)
        if all(i in runs and runs[i].state and runs[i].state.is_final() for i in ids):
            return {i: runs[i].state.type.value for i in ids}
        return None

    return _until(read, 20, 0.25)


# ---- without workers ----------------------------------------------------------------------------


def test_register_task_is_idempotent() -> None:
    own = Celery("register_test", broker="memory://", backend="cache+memory://")
    assert register_task(own) is register_task(own)
    assert TASK_NAME in own.tasks


def test_runner_needs_a_result_backend_and_a_start() -> None:
    with pytest.raises(ValueError, match="result backend"):
        CeleryTaskRunner(Celery("no_backend", broker="memory://"))
    with pytest.raises(RuntimeError, match="started"):
        CeleryTaskRunner(app).submit(square, {"x": 1})


def test_bad_routing_tags_fail_at_submit() -> None:
    with CeleryTaskRunner(app) as runner:
        with pytest.raises(ValueError, match="several queue tags"):
            runner.submit(square.with_options(tags={"queue:a", "queue:b"}), {"x": 1})
        with pytest.raises(ValueError, match="priority"):
            runner.submit(square.with_options(tags={"priority:high"}), {"x": 1})


def test_runs_not_started_are_revoked_at_exit_and_by_cancel_all() -> None:
    """No worker serves this queue: cancelling must not wait for one."""
    store = redis.Redis.from_url(REDIS_URL)
    queue = f"nobody-{RUN}"
    gate: concurrent.futures.Future[Any] = concurrent.futures.Future()
    upstream = PrefectConcurrentFuture(uuid.uuid4(), gate)
    template = CeleryTaskRunner(app, default_queue=queue)
    try:
        with template.duplicate() as runner:
            by_parameter = runner.submit(square, {"x": upstream})
            assert by_parameter.state.is_pending()
            assert by_parameter.cancel() and by_parameter.state.is_cancelled()
            assert not by_parameter.cancel()
            nested = runner.submit(square, {"x": [upstream]})
            template.cancel_all()  # what Prefect's flow engine calls: reaches the duplicate
            assert nested.state.is_cancelled()
        with template.duplicate() as runner:
            waiting = runner.submit(square, {"x": 1}, wait_for=[upstream])
            queued = runner.submit(square, {"x": 3})
            _until(lambda: store.llen(queue) == 1, 10, 0.02)
        for future in (waiting, queued):  # the runner closed before either started
            assert future.state.is_cancelled(), future.state
        assert queued.celery_result.state == "REVOKED"
        gate.set_result(2)  # too late: nothing more is sent
        with pytest.raises(CancelledRun):
            waiting.result(timeout=1)
        assert store.llen(queue) == 1
    finally:
        store.delete(queue)


def test_runner_pickles_with_its_config() -> None:
    runner = CeleryTaskRunner(app, default_queue="cpu", queue_tag_prefix="q:")
    with runner:
        copy = cloudpickle.loads(cloudpickle.dumps(runner))
    assert (copy._default_queue, copy._queue_tag_prefix) == ("cpu", "q:")
    with copy.duplicate() as twin:
        assert twin._started and twin._default_queue == "cpu"


# ---- on the workers -----------------------------------------------------------------------------


@flow(task_runner=CeleryTaskRunner(app))
def placement() -> dict[str, Any]:
    default = where.submit()
    gpu = where.with_options(tags=GPU | {"priority:7"}).submit()
    with tags("queue:gpu"):
        by_context = where.submit()
    return {
        "default": default.result() | {"task_run_id": str(default.task_run_id)},
        "gpu": gpu.result(),
        "by_context": by_context.result(),
    }


def test_tasks_run_on_the_worker_of_their_queue(workers: dict[str, int]) -> None:
    seen = placement()
    assert seen["default"]["pid"] != os.getpid()
    assert seen["default"]["worker_pid"] == workers["celery"]
    assert seen["default"]["celery_id"] == seen["default"]["task_run_id"]
    assert seen["gpu"]["worker_pid"] == workers["gpu"]
    assert seen["gpu"]["priority"] == 7
    assert seen["by_context"]["worker_pid"] == workers["gpu"]


@flow(task_runner=CeleryTaskRunner(app))
def fan_out_fan_in() -> dict[str, Any]:
    squares = [square.submit(i) for i in range(6)]
    called: list[uuid.UUID] = []
    squares[0].add_done_callback(lambda f: called.append(f.task_run_id))
    summed = total.submit(squares)  # futures inside a list parameter
    after = where.submit(wait_for=[summed])
    done, not_done = wait(squares, timeout=60)
    completed = [f.result() for f in as_completed(squares, timeout=60)]
    return {
        "sum": summed.result(),
        "waited": (len(done), len(not_done)),
        "as_completed": sorted(completed),
        "after_ran": after.result()["pid"] > 0 and summed.state.is_completed(),
        "mapped": square.map([7, 8]).result(),
        "callback": called == [squares[0].task_run_id],
    }


def test_fan_out_and_fan_in(workers: dict[str, int]) -> None:
    result = fan_out_fan_in()
    assert result == {
        "sum": 55,
        "waited": (6, 0),
        "as_completed": [0, 1, 4, 9, 16, 25],
        "after_ran": True,
        "mapped": [49, 64],
        "callback": True,
    }


@flow(task_runner=CeleryTaskRunner(app))
def with_a_failure() -> dict[str, Any]:
    bad = boom.submit("no such key")
    good = square.submit(3)
    downstream = square.submit(bad)
    with pytest.raises(KeyError, match="no such key"):
        bad.result()
    assert isinstance(bad.result(raise_on_failure=False), KeyError)
    downstream.wait()
    return {
        "states": [bad.state.type, good.state.type, downstream.state.name],
        "ids": [bad.task_run_id, good.task_run_id],
        "good": good.result(),
    }


def test_a_raising_task_fails_and_the_api_records_every_state(workers: dict[str, int]) -> None:
    state: State[Any] = with_a_failure(return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["states"] == [StateType.FAILED, StateType.COMPLETED, "NotReady"]
    assert result["good"] == 9
    flow_run_id = state.state_details.flow_run_id
    bad, good = result["ids"]
    assert _final_task_states(flow_run_id, [bad, good]) == {bad: "FAILED", good: "COMPLETED"}
    from prefect import get_client

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.type == StateType.COMPLETED


@flow(task_runner=CeleryTaskRunner(app))
def with_an_async_task() -> int:
    return async_where.submit(0.05).result()


def test_async_tasks_run_on_the_worker(workers: dict[str, int]) -> None:
    assert with_an_async_task() == workers["celery"]


@flow(task_runner=CeleryTaskRunner(app))
def with_an_unloadable_parameter(module: str) -> tuple[StateType, str | None]:
    future = square.submit(importlib.import_module(module).Thing())
    with pytest.raises(ModuleNotFoundError):
        future.result(timeout=30)
    return future.state.type, future.state.message  # (a returned State would end the flow)


def test_a_celery_level_failure_crashes_the_future(
    workers: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker cannot unpickle a parameter whose class lives only in this process."""
    module = f"only_here_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    state_type, message = with_an_unloadable_parameter(module)
    assert state_type == StateType.CRASHED and "ModuleNotFoundError" in (message or "")


@flow(task_runner=CeleryTaskRunner(app))
def cancel_a_queued_run(marker: str) -> dict[str, Any]:
    store = redis.Redis.from_url(REDIS_URL)
    blocker = nap.with_options(tags=GPU).submit(1.5)
    _until(lambda: blocker.celery_result.state == "STARTED", 30)
    victim = touch.with_options(tags=GPU).submit(marker)
    _until(lambda: store.llen("gpu") == 1, 10, 0.02)  # in the broker, behind the blocker
    cancelled = victim.cancel()
    blocker_result = blocker.result(timeout=30)
    _until(lambda: store.llen("gpu") == 0, 10)  # the worker took it and dropped it
    time.sleep(0.5)
    return {
        "cancelled": cancelled,
        "state": victim.state.type,
        "celery": victim.celery_result.state,
        "blocker": blocker_result,
        "cancel_again": victim.cancel(),
    }


def test_cancel_revokes_a_queued_task(workers: dict[str, int], tmp_path: Path) -> None:
    marker = tmp_path / "victim-ran"
    assert cancel_a_queued_run(str(marker)) == {
        "cancelled": True,
        "state": StateType.CANCELLED,
        "celery": "REVOKED",
        "blocker": 1.5,
        "cancel_again": False,
    }
    assert not marker.exists()


@flow(task_runner=CeleryTaskRunner(app))
def lose_a_worker_process(marker: str) -> tuple[str, uuid.UUID]:
    future = die_once.submit(marker)
    return future.result(timeout=60), future.task_run_id


def test_a_lost_worker_process_means_redelivery_under_the_same_id(
    workers: dict[str, int], tmp_path: Path
) -> None:
    """acks_late + reject_on_worker_lost: the run is delivered again, not lost or crashed."""
    state: State[Any] = lose_a_worker_process(str(tmp_path / "died"), return_state=True)
    result, task_run_id = state.result()
    assert result == "second delivery"
    flow_run_id = state.state_details.flow_run_id
    assert _final_task_states(flow_run_id, [task_run_id]) == {task_run_id: "COMPLETED"}


@flow(task_runner=CeleryTaskRunner(app))
def terminate_a_running_run() -> dict[str, Any]:
    sleeper = nap.with_options(tags=GPU).submit(60)
    _until(lambda: _api_state(sleeper.task_run_id) == StateType.RUNNING, 30)  # in its body
    start = time.monotonic()
    revoked = sleeper.revoke(terminate=True)
    sleeper.wait(timeout=20)
    return {
        "revoked": revoked,
        "state": sleeper.state.type,
        "seconds": time.monotonic() - start,
        "id": sleeper.task_run_id,
        "next": where.with_options(tags=GPU).submit().result(timeout=30)["worker_pid"],
    }


def test_revoke_terminate_kills_a_running_task(workers: dict[str, int]) -> None:
    state: State[Any] = terminate_a_running_run(return_state=True)
    result = state.result()
    assert result["revoked"] and result["state"] == StateType.CANCELLED
    assert result["seconds"] < 15
    assert result["next"] == workers["gpu"]  # the worker replaced its killed process
    flow_run_id = state.state_details.flow_run_id
    assert _final_task_states(flow_run_id, [result["id"]]) == {result["id"]: "CRASHED"}


def test_the_filesystem_transport_and_file_results(
    workers: dict[str, int], files_root: Path, tmp_path: Path
) -> None:
    """The platform's embedded default: kombu's filesystem broker, file:// results."""
    files = make_files_app(files_root)
    queue_folder = files_root / "queue"

    @flow(task_runner=CeleryTaskRunner(files, default_queue="files"))
    def on_files(marker: str) -> dict[str, Any]:
        squares = [square.submit(i) for i in range(3)]
        blocker = nap.submit(1.0)
        _until(lambda: blocker.celery_result.state == "STARTED", 30)
        victim = touch.submit(marker)
        _until(lambda: len(list(queue_folder.iterdir())) == 1, 10, 0.02)
        cancelled = victim.cancel()
        blocker.wait(30)
        _until(lambda: not list(queue_folder.iterdir()), 10)  # taken and dropped
        return {
            "sum": total.submit(squares).result(),
            "worker_pid": where.submit().result()["worker_pid"],
            "cancelled": cancelled,
        }

    marker = tmp_path / "victim-ran"
    assert on_files(str(marker)) == {"sum": 5, "worker_pid": workers["files"], "cancelled": True}
    assert not marker.exists()

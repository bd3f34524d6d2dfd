"""Orchestration overhead: a 200-task DAG of noop tasks, three ways, in one run.

Shape: 4 levels of 50 tasks; every task of a level depends on every task of the level
before (fan-out 50 x 4 levels, a barrier between levels).

- DeepFlow: POST /v1/jobs -> Prefect flow run -> Celery workers on Redis (2 workers), to
  ``succeeded`` as the API reports it; PostgreSQL store.
- Plain Celery: the same 200 noop tasks as one Celery ``group`` per level, each level
  waited for before the next (a chord's barrier), on the same 2 workers' configuration.
- Prefect ThreadPoolTaskRunner: the same DAG as Prefect tasks with ``wait_for`` on the
  previous level, in one flow run (Prefect's default runner, in-process threads).

Prints a table of seconds per job and per task (median of --runs), and DeepFlow's
per-task overhead as a multiple of plain Celery's.

    .venv/bin/python bench/dag_overhead.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT), str(ROOT / "bench")]

from deepflow.config import Settings, normalize_database_url  # noqa: E402
from deepflow.launcher import ApiServer, Stack, free_port  # noqa: E402
from deepflow.procutil import freeze_heap  # noqa: E402
from deepflow.store import Database, create_api_key, schema  # noqa: E402

LEVELS, WIDTH = 4, 50
BROKER = "redis://127.0.0.1:6379/8"
CELERY = "plain Celery (group per level)"
PREFECT = "Prefect ThreadPoolTaskRunner"
DEEPFLOW = "DeepFlow (API -> Prefect -> Celery)"
PEER_BROKER = "redis://127.0.0.1:6379/9"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def dag_spec() -> dict[str, Any]:
    tasks: list[dict[str, Any]] = []
    for level in range(LEVELS):
        before = [f"l{level - 1}_{j}" for j in range(WIDTH)] if level else []
        tasks += [
            {"name": f"l{level}_{j}", "operator": "noop", "depends_on": before}
            for j in range(WIDTH)
        ]
    return {"tasks": tasks}


def bench_deepflow(runs: int, home: Path) -> tuple[list[float], list[float]]:
    """Wall seconds from POST to succeeded, and seconds from the job's start to its end."""
    import psycopg

    db_name = f"deepflow_bench_{os.getpid()}"
    with psycopg.connect(PG_SERVER, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{db_name}"')
        c.execute(f'CREATE DATABASE "{db_name}"')
        c.execute(f'DROP DATABASE IF EXISTS "{db_name}_prefect"')
        c.execute(f'CREATE DATABASE "{db_name}_prefect"')
    redis.Redis.from_url(BROKER).flushdb()
    settings = Settings(
        home=home,
        database_url=normalize_database_url(f"postgresql://postgres@127.0.0.1:5432/{db_name}"),
        broker_url=BROKER,
        prefect_port=free_port(),
    )
    schema.upgrade(settings.database_url)
    stack = Stack(settings, {"PREFECT_UI_ENABLED": "false"})  # Prefect on f"{db_name}_prefect"
    api = None
    walls: list[float] = []
    inner: list[float] = []
    try:
        stack.start_prefect_server()
        stack.start_prefect_worker()
        for _ in range(2):
            stack.start_worker("cpu", concurrency=1)
        db = Database(stack.settings.database_url)
        with db.transaction() as s:
            _, key = create_api_key(s, "bench")
        api = ApiServer(stack.settings, db).start()
        freeze_heap()  # as `deepflow up` does in the process that serves the API
        # One client: a new httpx client per poll loads the CA bundle (~20 ms of CPU each)
        # on a machine whose two cores the platform under test needs.
        client = httpx.Client(
            base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        body = {"kind": "dag", "spec": dag_spec()}
        for run in range(runs + 1):  # the first run warms the workers up and is not counted
            t0, posted = time.perf_counter(), time.time()
            job = client.post("/v1/jobs", json=body).json()
            accepted = time.perf_counter() - t0
            while job["state"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.05)  # poll the list (job summaries), not the 7,500-edge job
                job = client.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
            wall = time.perf_counter() - t0
            assert job["state"] == "succeeded", job["error"]
            started = _ts(job["started_at"])
            finished = _ts(job["finished_at"])
            label = "warm-up" if run == 0 else f"run {run}"
            waited = started - posted
            print(
                f"  deepflow {label}: {wall:.2f}s end to end, POST answered in {accepted:.2f}s, "
                f"{waited:.2f}s to start, {finished - started:.2f}s running"
            )
            if run:
                walls.append(wall)
                inner.append(finished - started)
    finally:
        if api is not None:
            api.stop()
        stack.stop()
        with psycopg.connect(PG_SERVER, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            c.execute(f'DROP DATABASE IF EXISTS "{db_name}_prefect" WITH (FORCE)')
    return walls, inner


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def bench_celery(runs: int, home: Path) -> list[float]:
    from celery import group

    redis.Redis.from_url(PEER_BROKER).flushdb()
    env = {**os.environ, "PEER_BROKER_URL": PEER_BROKER, "PYTHONPATH": str(ROOT / "bench")}
    workers = []
    for i in range(2):
        argv = [sys.executable, "-m", "celery", "-A", "celery_peer", "worker", "--pool", "prefork",
                "--concurrency", "1", "--hostname", f"peer{i}@%h", "--loglevel", "WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        with open(home / f"peer{i}.log", "wb") as log:
            workers.append(
                subprocess.Popen(
                    argv,
                    env=env,
                    cwd=ROOT / "bench",
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    import celery_peer

    times: list[float] = []
    try:
        for run in range(runs + 1):
            t0 = time.perf_counter()
            for _ in range(LEVELS):
                group(celery_peer.noop.s() for _ in range(WIDTH)).apply_async().get(timeout=120)
            if run:
                times.append(time.perf_counter() - t0)
    finally:
        for w in workers:
            w.terminate()
            w.wait(30)
    return times


def bench_prefect_threads(runs: int, home: Path) -> list[float]:
    stack = Stack(
        Settings(home=home / "pt", database_url="sqlite://", broker_url="memory://",
                 prefect_port=free_port()),
        {"PREFECT_UI_ENABLED": "false"},
    )  # fmt: skip
    try:
        url = stack.start_prefect_server()
        code = _PREFECT_PEER.replace("RUNS", str(runs)).replace("LEVELS", str(LEVELS))
        code = code.replace("WIDTH", str(WIDTH))
        env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_LOGGING_LEVEL": "WARNING"}  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        return [float(x) for x in out.split()]
    finally:
        stack.stop()


_PREFECT_PEER = """
import time
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

@task
def noop():
    return None

@flow(task_runner=ThreadPoolTaskRunner(max_workers=4))
def dag():
    previous = []
    for level in range(LEVELS):
        previous = [noop.submit(wait_for=previous) for _ in range(WIDTH)]
    for f in previous:
        f.wait()

for run in range(RUNS + 1):
    t0 = time.perf_counter()
    dag()
    if run:
        print(time.perf_counter() - t0)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--only", choices=["celery", "prefect", "deepflow"], help="run one system (no ratio)"
    )
    args = parser.parse_args()
    tasks = LEVELS * WIDTH
    with tempfile.TemporaryDirectory(prefix="dag-overhead-") as tmp:
        home = Path(tmp)
        results: dict[str, list[float]] = {}
        steps: list[tuple[str, str, Callable[[], Any]]] = [
            ("celery", CELERY, lambda: bench_celery(args.runs, home)),
            ("prefect", PREFECT, lambda: bench_prefect_threads(args.runs, home)),
            ("deepflow", DEEPFLOW, lambda: bench_deepflow(args.runs, home)),
        ]
        for key, name, step in steps:
            if args.only not in (None, key):
                continue
            print(f"running {name} ...", flush=True)
            out = step()
            if isinstance(out, tuple):
                results[name], results["DeepFlow, job running only"] = out
            else:
                results[name] = out
    if args.only:
        return
    celery = statistics.median(results[CELERY]) / tasks
    print(f"\n{tasks} noop tasks, {LEVELS} levels x {WIDTH}, 2 workers, median of {args.runs}")
    print(f"{'system':<38} {'s/job':>8} {'ms/task':>9} {'x Celery':>9}")
    for name, times in results.items():
        per_job = statistics.median(times)
        per_task = per_job / tasks
        print(f"{name:<38} {per_job:>8.2f} {per_task * 1000:>9.2f} {per_task / celery:>9.2f}")


if __name__ == "__main__":
    main()

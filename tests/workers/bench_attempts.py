"""Micro-benchmark: the per-attempt cost of ``execute_task`` for noop tasks on real PostgreSQL.

    .venv/bin/python -m tests.workers.bench_attempts [--tasks 200] [--rounds 3]
        [--fresh] [--compare MODULE]

Each attempt is queued (not timed), then run through ``execute_task`` as a worker would:
claim, run the operator, report. Prefect, Celery and the flows are imported first, so the
process is as big as a Celery pool process (what a fork copies the page tables of). Prints
the median, mean and 95th percentile of one attempt's wall time, and the CPU time per
attempt of this process and its attempt processes together, per round.

``--fresh`` adds a variant that forks a fresh attempt process for every attempt
(``ATTEMPTS_PER_PROCESS = 1``). ``--compare MODULE`` names another module with an
``execute_task`` (an older version, say, importable from PYTHONPATH). Variants' rounds
alternate, so a machine whose load changes over the run (shared development VMs do) weighs
on all alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepflow import dag
from deepflow.config import Settings
from deepflow.store import create_job, ensure_tenant, get_database, queue_task, schema
from deepflow.workers import attempt_process
from deepflow.workers.execute import execute_task
from tests.conftest import create_pg_database, drop_pg_database

Execute = Callable[[str, int, Settings], Any]


def run_round(execute: Execute, settings: Settings, tasks: int) -> list[float]:
    db = get_database(settings.database_url)
    spec = {"tasks": [{"name": f"t{i}", "operator": "noop"} for i in range(tasks)]}
    with db.transaction() as s:
        tenant = ensure_tenant(s, "bench")
        job, _ = create_job(s, tenant.id, dag.plan("dag", spec), "dag")
        ids = [t.id for t in job.tasks]
    times = []
    for task_id in ids:
        with db.transaction() as s:
            attempt = queue_task(s, task_id).attempt
        start = time.perf_counter()
        execute(task_id, attempt, settings)
        times.append(time.perf_counter() - start)
    return times


def cpu_s() -> float:
    """CPU seconds of this process, its reaped children, and its live children (/proc)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid; then utime and stime are fields 14 and 15 of stat
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def fresh_process_each(execute: Execute) -> Execute:
    def run(task_id: str, attempt: int, settings: Settings) -> Any:
        saved, attempt_process.ATTEMPTS_PER_PROCESS = attempt_process.ATTEMPTS_PER_PROCESS, 1
        attempt_process.release()  # one the other variant left, for up to 500 attempts
        try:
            return execute(task_id, attempt, settings)
        finally:
            attempt_process.ATTEMPTS_PER_PROCESS = saved

    return run


def report(name: str, times: list[float], cpu: float) -> str:
    ms = sorted(t * 1000 for t in times)
    return (
        f"{name}: {len(ms)} noop attempts, total {sum(ms):.0f} ms; per attempt median"
        f" {statistics.median(ms):.2f} ms, mean {statistics.mean(ms):.2f} ms,"
        f" p95 {ms[int(len(ms) * 0.95)]:.2f} ms; CPU {cpu * 1000 / len(ms):.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="also a fork per attempt")
    parser.add_argument("--compare", help="a module with another execute_task")
    opts = parser.parse_args()
    variants: dict[str, Execute] = {"this": execute_task}
    if opts.fresh:
        variants["fork per attempt"] = fresh_process_each(execute_task)
    if opts.compare:
        variants[opts.compare] = importlib.import_module(opts.compare).execute_task
    url = create_pg_database("deepflow_bench")
    try:
        schema.upgrade(url)
        settings = dataclasses.replace(Settings.from_env(), database_url=url)
        for execute in variants.values():
            run_round(execute, settings, 20)  # warm up: connections, caches
        totals: dict[str, list[float]] = {name: [] for name in variants}
        cpu = dict.fromkeys(variants, 0.0)
        for i in range(opts.rounds):
            for name, execute in variants.items():
                before = cpu_s()
                times = run_round(execute, settings, opts.tasks)
                used = cpu_s() - before
                totals[name] += times
                cpu[name] += used
                print(f"round {i + 1}, {report(name, times, used)}", flush=True)
        for name, times in totals.items():
            print(f"all rounds, {report(name, times, cpu[name])}")
    finally:
        for db in (get_database(url), get_database(url, durable=False)):
            db.dispose()
        drop_pg_database(url)


if __name__ == "__main__":
    main()

"""The dashboard's job list with many jobs: what one refresh of the list page costs.

For N jobs of one tenant (each a 2-task DAG, a third of them cancelled), inserted through
the store, times over real HTTP (the API in this process, uvicorn):

- the dashboard's page (``GET /ui/api/jobs``: 50 jobs, counts per state, kinds, task
  progress), first page and a deep page (offset N - 50), a state filter and a search;
- the jobs API's page (``GET /v1/jobs?limit=50``) side by side, as the peer.

Prints a table of milliseconds per request (median of --runs), on SQLite and PostgreSQL.

    .venv/bin/python bench/dashboard_list.py [--jobs 1000 10000] [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from deepflow import dag, store  # noqa: E402
from deepflow.config import Settings  # noqa: E402
from deepflow.launcher import ApiServer  # noqa: E402
from deepflow.store import Database, schema  # noqa: E402
from tests.conftest import create_pg_database, drop_pg_database  # noqa: E402

PLAN = dag.plan(
    "dag",
    {
        "tasks": [
            {"name": "a", "operator": "noop"},
            {"name": "b", "operator": "noop", "depends_on": ["a"]},
        ]
    },
)


def fill(db: Database, n: int) -> tuple[str, str]:
    """n jobs for a new tenant; returns its key and the id of a job in the middle."""
    with db.transaction() as s:
        tenant, key = store.create_api_key(s, "bench")
        tenant_id = tenant.id
    ids: list[str] = []
    for start in range(0, n, 1000):
        with db.transaction() as s:
            for i in range(start, min(n, start + 1000)):
                job, _ = store.create_job(s, tenant_id, PLAN, "dag")
                ids.append(job.id)
                if i % 3 == 0:
                    store.cancel_job(s, tenant_id, job.id)
    return key, ids[n // 2]


def median_ms(client: httpx.Client, path: str, params: dict[str, object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        r = client.get(path, params=params)
        times.append((time.perf_counter() - start) * 1000)
        assert r.status_code == 200, r.text
    return statistics.median(times)


def measure(url: str, n: int, runs: int) -> dict[str, float]:
    db = Database(url)
    schema.upgrade(url)
    key, middle = fill(db, n)
    home = Path(tempfile.mkdtemp())
    api = ApiServer(Settings(home=home, database_url=url, broker_url="memory://"), db).start()
    try:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}) as c:
            cases = {
                "dashboard, first page": ("/ui/api/jobs", {"limit": 50}),
                "dashboard, last page": ("/ui/api/jobs", {"limit": 50, "offset": n - 50}),
                "dashboard, state=cancelled": ("/ui/api/jobs", {"limit": 50, "state": "cancelled"}),
                "dashboard, search an id": ("/ui/api/jobs", {"limit": 50, "q": middle[-12:]}),
                "jobs API (peer), first page": ("/v1/jobs", {"limit": 50}),
            }
            return {name: median_ms(c, path, p, runs) for name, (path, p) in cases.items()}
    finally:
        api.stop()
        db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    rows: dict[str, dict[str, float]] = {}
    for n in args.jobs:
        with tempfile.TemporaryDirectory() as tmp:
            rows[f"SQLite, {n} jobs"] = measure(f"sqlite:///{tmp}/bench.db", n, args.runs)
        pg = create_pg_database("deepflow_bench_list")
        try:
            rows[f"PostgreSQL, {n} jobs"] = measure(pg, n, args.runs)
        finally:
            drop_pg_database(pg)
    cases = list(next(iter(rows.values())))
    print(f"median ms per request over HTTP ({args.runs} runs)")
    print("| case | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for case in cases:
        print(f"| {case} | " + " | ".join(f"{rows[r][case]:.1f}" for r in rows) + " |")


if __name__ == "__main__":
    main()

"""Soak: the platform under steady load for ``--minutes``, sampled every ``--every`` seconds.

The fault rig (``tests/faults/rig.py``: ``deepflow up`` on a PostgreSQL and a Redis of its own,
Prefect's server on a database beside ours, a second API process, a deployment of the tiny
model) runs DAG jobs (one every ``--job-every`` seconds) and two streaming chat loops without a
pause. Each sample records the memory (RSS) of every process of the platform by part, their
open file descriptors, both databases' connections, the jobs accepted but not yet ended, the
engine's KV cache in use, the processes alive, and the chat latencies and outcomes of the
window. At the end the load stops, the KV cache must drain to empty and every job succeed.

Prints a table comparing the first five minutes after warm-up with the last five (memory flat
within 10%, no growth in descriptors, connections, processes or the jobs' backlog, p99 latency
stable), writes the samples as CSV and a chart of each series over time as SVG under
``--out``, and exits non-zero if a check fails or a request was lost. ``--prefect-sqlite``
puts Prefect's server on a SQLite file, as the embedded default does.

    .venv/bin/python bench/soak.py [--minutes 30] [--every 10] [--job-every 1]
                                   [--prefect-sqlite] [--out soak-results]
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepflow.engine.testmodel import make_test_model  # noqa: E402
from deepflow.prefect_database import PREFECT_DATABASE_SUFFIX  # noqa: E402
from tests.faults.rig import Load, Rig  # noqa: E402
from tests.replicas.conftest import live_processes  # noqa: E402

WARM_UP_S = 180.0
"""Excluded from the comparison: caches, pools and the first compilations fill up."""
WINDOW_S = 300.0
"""The first and the last stretch compared."""
PARTS = [  # (part, a pattern of its command line), first match wins
    ("engine daemon", r"deepflow\.cli serve|deepflow serve|engine\.daemon"),
    ("prefect server", r"prefect server start"),
    ("celery worker", r"deepflow(\.cli)? worker"),
    ("prefect worker", r"prefect-worker"),
    ("flow runs", r"forkserver"),
    ("api", r"deepflow(\.cli)? api"),
    ("up", r"deepflow(\.cli)? up"),
]
KV_METRIC = re.compile(r"^flowserve:kv_cache_usage_perc\{[^}]*\} ([0-9.e+-]+)$", re.M)


@dataclass
class Chats:
    """Chat latencies of the current window, and outcomes over the run."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    window: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def drain(self) -> list[float]:
        with self.lock:
            out, self.window = self.window, []
        return out


def _ours(home: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every process with the rig's DEEPFLOW_HOME."""
    marker = f"DEEPFLOW_HOME={home}".encode()
    found = []
    for pid, _, _ in live_processes():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found.append((pid, f.read().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return found


def _part(cmdline: str) -> str:
    return next((name for name, pattern in PARTS if re.search(pattern, cmdline)), "other")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def sample(rig: Rig, chats: Chats, started: float) -> dict[str, float]:
    row: dict[str, float] = defaultdict(float)
    row["t_min"] = (time.monotonic() - started) / 60
    flow_runs: list[float] = []
    for pid, cmdline in _ours(rig.home):
        part = _part(cmdline)
        try:
            rss = _rss_mb(pid)
            row["open fds"] += len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except OSError:  # it exited meanwhile
            continue
        if part == "flow runs":  # one process a job, as many as jobs run: the mean
            flow_runs.append(rss)
        else:
            row[f"rss_mb {part}"] += rss
        row["processes"] += 1
    if flow_runs:
        row["rss_mb a flow-run process"] = statistics.fmean(flow_runs)
    assert rig.db is not None
    with rig.db.transaction() as s:
        row["db connections"] = s.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        ).scalar_one()
        row["prefect db connections"] = s.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() || :suffix"
            ),
            {"suffix": PREFECT_DATABASE_SUFFIX},
        ).scalar_one()
        row["jobs unfinished"] = s.execute(
            text("SELECT count(*) FROM jobs WHERE state IN ('pending', 'queued', 'running')")
        ).scalar_one()
    row["kv cache used %"] = 100 * _kv_usage(rig)
    latencies = sorted(chats.drain())
    if latencies:
        row["chat p50 s"] = statistics.median(latencies)
        row["chat p99 s"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        row["chats"] = len(latencies)
    return dict(row)


def _kv_usage(rig: Rig) -> float:
    """The largest KV cache use among the deployment's ready instances (0..1)."""
    usage = 0.0
    for instance in rig.deployment()["instances"]:
        if instance["state"] != "ready":
            continue
        try:
            metrics = httpx.get(f"{instance['address']}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        usage = max([usage, *(float(v) for v in KV_METRIC.findall(metrics))])
    return usage


def load(
    rig: Rig, chats: Chats, jobs: Load, stop: threading.Event, job_every_s: float
) -> list[threading.Thread]:
    def submit() -> None:
        while not stop.is_set():
            rig.submit(jobs, rig.job_spec(uuid.uuid4().hex[:8]))
            stop.wait(job_every_s)

    def chat(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            t0 = time.monotonic()
            outcome = rig.chat_once(None, k * 1_000_000 + i)
            with chats.lock:
                chats.outcomes[outcome] += 1
                if outcome == "ok":
                    chats.window.append(time.monotonic() - t0)
            if outcome != "ok":
                stop.wait(0.5)

    threads = [threading.Thread(target=submit, daemon=True)]
    threads += [threading.Thread(target=chat, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    return threads


def compare(rows: list[dict[str, float]], minutes: float) -> tuple[list[list[str]], list[str]]:
    """Per series: mean of the first window after warm-up, mean of the last, the change,
    and what fails (the checks' list)."""
    first_end = (WARM_UP_S + WINDOW_S) / 60
    last_start = minutes - WINDOW_S / 60
    first = [r for r in rows if WARM_UP_S / 60 <= r["t_min"] < first_end]
    last = [r for r in rows if r["t_min"] >= last_start]
    series = sorted({k for r in rows for k in r if k != "t_min"})
    table, failed = [], []
    for name in series:
        a = statistics.fmean(r.get(name, 0.0) for r in first) if first else 0.0
        b = statistics.fmean(r.get(name, 0.0) for r in last) if last else 0.0
        change = (b - a) / a if a else 0.0
        limit = _limit(name)
        ok = limit is None or change <= limit or (b - a) <= _slack(name)
        if not ok:
            failed.append(f"{name}: {a:.1f} -> {b:.1f} ({change:+.0%}, limit {limit:+.0%})")
        table.append([name, f"{a:.1f}", f"{b:.1f}", f"{change:+.1%}", "ok" if ok else "FAILS"])
    return table, failed


def _limit(name: str) -> float | None:
    if name.startswith("rss_mb"):
        return 0.10
    if name in ("open fds", "db connections", "prefect db connections", "processes"):
        return 0.10
    if name == "jobs unfinished":  # a backlog that grows: the platform falls behind
        return 0.50
    if name == "chat p99 s":
        return 0.50
    return None


def _slack(name: str) -> float:
    """An absolute change too small to mean a leak (a flow-run process more or less)."""
    slack = {"open fds": 20, "db connections": 2, "prefect db connections": 2, "processes": 2}
    return {**slack, "jobs unfinished": 10}.get(name, 0.0)


def svg(rows: list[dict[str, float]], path: Path) -> None:
    """One small line chart per series, stacked: memory, descriptors, connections, KV use
    and latency over the run's minutes."""
    series = sorted({k for r in rows for k in r if k not in ("t_min", "chats")})
    w, h, pad = 640, 120, 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{len(series) * (h + 30)}" '
        'font-family="sans-serif" font-size="11">'
    ]
    t_max = max(r["t_min"] for r in rows) or 1.0
    for i, name in enumerate(series):
        y0 = i * (h + 30) + 20
        points = [(r["t_min"], r[name]) for r in rows if name in r]
        v_max = max((v for _, v in points), default=1.0) or 1.0
        xy = " ".join(
            f"{pad + t / t_max * (w - 2 * pad):.1f},{y0 + h - v / v_max * (h - 10):.1f}"
            for t, v in points
        )
        parts += [
            f'<text x="{pad}" y="{y0 - 4}">{name} (max {v_max:.1f}; x: 0 to {t_max:.0f} min)'
            "</text>",
            f'<rect x="{pad}" y="{y0}" width="{w - 2 * pad}" height="{h}" fill="none" '
            'stroke="#ccc"/>',
            f'<polyline points="{xy}" fill="none" stroke="#2563eb" stroke-width="1.5"/>',
        ]
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=Path("soak-results"))
    parser.add_argument("--job-every", type=float, default=1.0, help="seconds between jobs")
    parser.add_argument(
        "--prefect-sqlite",
        action="store_true",
        help="Prefect's server on a SQLite file in the home (the embedded default's) instead "
        "of a database beside ours",
    )
    args = parser.parse_args()
    if args.minutes * 60 < WARM_UP_S + 2 * WINDOW_S:
        print(f"note: under {(WARM_UP_S + 2 * WINDOW_S) / 60:.0f} minutes the windows overlap")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, float]] = []
    chats, jobs, stop = Chats(), Load(), threading.Event()
    with tempfile.TemporaryDirectory(prefix="deepflow-soak-") as tmp:
        root = Path(tmp)
        rig = Rig(root / "rig", make_test_model(root / "model", "llama", "tiny"))
        if args.prefect_sqlite:
            sqlite = f"sqlite+aiosqlite:///{rig.home / 'prefect' / 'prefect.db'}"
            rig.extra_env["DEEPFLOW_PREFECT_DATABASE_URL"] = sqlite
        try:
            rig.start()
            started = time.monotonic()
            threads = load(rig, chats, jobs, stop, args.job_every)
            next_at = started
            while (next_at := next_at + args.every) < started + args.minutes * 60:
                time.sleep(max(0.0, next_at - time.monotonic()))
                rows.append(sample(rig, chats, started))
                last = rows[-1]
                rss = sum(v for k, v in last.items() if k.startswith("rss_mb ") and "a " not in k)
                print(
                    f"[{last['t_min']:5.1f} min] rss {rss:.0f} MB, fds {last['open fds']:.0f}, "
                    f"db {last['db connections']:.0f}, kv {last['kv cache used %']:.0f}%, "
                    f"p99 {last.get('chat p99 s', 0):.2f} s, jobs {len(jobs.jobs)}",
                    flush=True,
                )
            stop.set()
            for t in threads:
                t.join(120)
            time.sleep(10)
            drained = _kv_usage(rig)
            ended = {"succeeded": 0, "other": 0}
            assert rig.db is not None
            deadline = time.monotonic() + 180  # for all of them together
            for job_id in jobs.jobs:
                state = rig.wait_job(job_id, deadline)
                ended["succeeded" if state == "succeeded" else "other"] += 1
        finally:
            stop.set()
            rig.stop()
            logs = args.out / "logs"  # kept: the temporary folder goes
            shutil.rmtree(logs, ignore_errors=True)
            shutil.copytree(rig.home / "logs", logs, dirs_exist_ok=True)
            for name in ("up.log", "api.log"):
                if (rig.root / name).exists():
                    shutil.copy(rig.root / name, logs / name)
    with open(args.out / "soak.csv", "w", newline="") as f:
        names = ["t_min", *sorted({k for r in rows for k in r if k != "t_min"})]
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    svg(rows, args.out / "soak.svg")
    table, failed = compare(rows, args.minutes)
    header = ["series", "first 5 min after warm-up", "last 5 min", "change", "check"]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for r in [header, *table]:
        print(" | ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)))
    lost = chats.outcomes.get("lost", 0) + jobs.job_refusals
    print(
        f"\nchats {dict(chats.outcomes)}, jobs accepted {len(jobs.jobs)} "
        f"(succeeded {ended['succeeded']}, other {ended['other']}), refused {jobs.job_refusals}; "
        f"KV cache in use after the load: {drained:.0%}; samples in {args.out}/"
    )
    if drained > 0:
        failed.append(f"the KV cache held {drained:.0%} after the load ended")
    if lost:
        failed.append(f"{lost} requests lost")
    if ended["other"]:
        failed.append(f"{ended['other']} jobs did not succeed")
    for problem in failed:
        print(f"FAILS: {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

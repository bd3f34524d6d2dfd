"""The command line's job commands (``submit``, ``jobs``, ``job``, ``logs``, ``cancel``,
``deployments``, ``status``, ``down``): thin over the HTTP API, as Prefect's and Airflow's
CLIs are over theirs, so they work against any DeepFlow the URL and key point at."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

from deepflow.api_client import Client, ClientError, read_up
from deepflow.config import Settings
from deepflow.dag import TaskState

POLL_S = 0.5
DOWN_TIMEOUT_S = 60.0
BAR_WIDTH = 30
STATE_ORDER = [s.value for s in TaskState]


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Columns padded to their widest cell; None shows as '-'."""
    cells = [[str(h) for h in headers]] + [
        ["-" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _when(stamp: str | None) -> str | None:
    return stamp[:19].replace("T", " ") if stamp else None


# ---- submit ---------------------------------------------------------------------------------
def read_spec(source: str, kind: str) -> dict[str, Any]:
    """The request body from a JSON file (or ``-``): either ``{"kind", "spec"}`` or a bare spec."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise ClientError(f"cannot read {source}: {exc.strerror}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClientError(f"{source} is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError(f"{source} must hold a JSON object (a job spec)")
    return body if "spec" in body else {"kind": kind, "spec": body}


def submit(args: argparse.Namespace) -> int:
    client = Client.from_env()
    job = client.post("/v1/jobs", read_spec(args.file, args.kind))
    print(job["id"], flush=True)
    if not args.wait:
        return 0
    return follow(client, job["id"], sys.stderr)


def progress_line(job: dict[str, Any]) -> str:
    """``[#####.....] 3/10 done · running 2 · pending 5`` for the job's tasks."""
    tasks = job["tasks"]
    counts = Counter(t["state"] for t in tasks)
    done = sum(TaskState(t["state"]).is_terminal for t in tasks)
    filled = BAR_WIDTH * done // max(len(tasks), 1)
    parts = " · ".join(f"{s} {counts[s]}" for s in STATE_ORDER if counts[s])
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{len(tasks)} done · {parts}"


def follow(client: Client, job_id: str, out: TextIO) -> int:
    """Show the job's progress until it ends; 0 if it succeeded, 1 otherwise. On a terminal
    the bar is redrawn in place, elsewhere a line is printed when it changes."""
    live = out.isatty()
    shown = ""
    while True:
        job = client.get(f"/v1/jobs/{job_id}")
        line = f"{job['state']:<9} {progress_line(job)}"
        if line != shown:
            out.write(f"\r\033[K{line}" if live else f"{line}\n")
            out.flush()
            shown = line
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(POLL_S)
    if live:
        out.write("\n")
    for task in job["tasks"]:
        if task["state"] == "failed":
            out.write(f"task {task['name']} failed: {task.get('error') or '(no message)'}\n")
    out.write(f"job {job_id} {job['state']}\n")
    return 0 if job["state"] == "succeeded" else 1


# ---- reading --------------------------------------------------------------------------------
def jobs(args: argparse.Namespace) -> int:
    page = Client.from_env().get("/v1/jobs", state=args.state, kind=args.kind, limit=args.limit)
    rows = [
        (j["id"], j["kind"], j["state"], _when(j["created_at"]), _when(j["finished_at"]))
        for j in page["data"]
    ]
    print(table(rows, ["ID", "KIND", "STATE", "CREATED", "FINISHED"]))
    if page.get("has_more"):
        print(f"(more: --limit {min(args.limit * 2, 100)}, or filter by --state / --kind)")
    return 0


def job(args: argparse.Namespace) -> int:
    data = Client.from_env().get(f"/v1/jobs/{args.id}")
    print(f"job {data['id']}  kind {data['kind']}  state {data['state']}")
    if data.get("error"):
        print(f"error: {data['error']}")
    rows = [
        (
            t["name"],
            t["operator"],
            t["state"],
            f"{t['attempt']}/{t['max_attempts']}",
            ",".join(t["depends_on"]) or None,
        )
        for t in data["tasks"]
    ]
    print(table(rows, ["TASK", "OPERATOR", "STATE", "ATTEMPT", "AFTER"]))
    return 0


def logs(args: argparse.Namespace) -> int:
    """Each task's attempt logs as they are stored; ``--follow``: until the job ends."""
    client = Client.from_env()
    seen: set[tuple[str, int]] = set()
    while True:
        job = client.get(f"/v1/jobs/{args.id}")
        names = [args.task] if args.task else [t["name"] for t in job["tasks"]]
        if args.task and args.task not in {t["name"] for t in job["tasks"]}:
            raise ClientError(f"job {args.id} has no task {args.task!r}")
        for name in names:
            for entry in client.get(f"/v1/jobs/{args.id}/tasks/{name}/logs")["data"]:
                if (name, entry["attempt"]) in seen:
                    continue
                seen.add((name, entry["attempt"]))
                print(f"== {name} · attempt {entry['attempt']} · {entry['outcome']}")
                if entry["text"]:
                    print(entry["text"].rstrip("\n"))
                if entry["dropped_chars"]:
                    print(f"({entry['dropped_chars']} characters dropped)")
                sys.stdout.flush()
        if not args.follow or job["state"] in ("succeeded", "failed", "cancelled"):
            return 0
        time.sleep(POLL_S)


def cancel(args: argparse.Namespace) -> int:
    data = Client.from_env().post(f"/v1/jobs/{args.id}/cancel")
    print(f"job {data['id']} {data['state']}")
    return 0


def deployments(args: argparse.Namespace) -> int:
    data = Client.from_env().get("/v1/deployments")["data"]
    rows = [
        (
            d["id"],
            d["model"],
            d["state"],
            f"{sum(i['state'] == 'ready' for i in d['instances'])}/{d['replicas']}",
            d["policy"],
            ", ".join(i["address"] for i in d["instances"] if i.get("address")) or None,
        )
        for d in data
    ]
    print(table(rows, ["ID", "MODEL", "STATE", "READY", "POLICY", "INSTANCES"]))
    return 0


# ---- the local platform ---------------------------------------------------------------------
def _alive(pid: int) -> bool:
    """Running: a process that exited but whose parent has not reaped it yet (a zombie) is
    not, though it still takes signals."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: signals are all we can tell by
    return stat.rpartition(")")[2].split()[0] != "Z"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def status(args: argparse.Namespace) -> int:
    """The health table ``up`` prints, read again: the API, Prefect, each process of ``up``."""
    settings = Settings.from_env()
    up = read_up(settings)
    if up is None or not _alive(up["pid"]):
        print(f"DeepFlow is not running (home {settings.home})")
        return 1
    health = {"api": _answers(f"{up['url']}/health")}
    if up.get("prefect_api_url"):
        health["prefect api"] = _answers(f"{up['prefect_api_url']}/health")
    health |= {name: _alive(pid) for name, pid in up["parts"].items()}
    print(f"DeepFlow is up (pid {up['pid']}, data in {settings.home})")
    print(f"  API          {up['url']}")
    for name, ok in health.items():
        print(f"  {name:<16} {'healthy' if ok else 'NOT RUNNING'}")
    return 0 if all(health.values()) else 1


def down(args: argparse.Namespace) -> int:
    """Stop the running ``deepflow up`` as its Ctrl-C would, and wait until it has."""
    settings = Settings.from_env()
    up = read_up(settings)
    if up is None or not _alive(up["pid"]):
        print(f"DeepFlow is not running (home {settings.home})")
        return 0
    os.kill(up["pid"], signal.SIGTERM)
    print(f"stopping DeepFlow (pid {up['pid']}) ...", flush=True)
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while _alive(up["pid"]):
        if time.monotonic() > deadline:
            raise ClientError(f"DeepFlow (pid {up['pid']}) did not stop in {DOWN_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    print("DeepFlow stopped.")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The job commands, on the ``deepflow`` parser's subcommands."""
    p = sub.add_parser("submit", help="submit a job from a JSON spec")
    p.add_argument("file", help="a JSON job spec ({'tasks': [...]}) or request body; - for stdin")
    p.add_argument(
        "--kind", default="dag", help="the job kind of a bare spec (default: %(default)s)"
    )
    p.add_argument(
        "--wait", action="store_true", help="follow it to the end; exit 1 unless it succeeds"
    )
    p.set_defaults(func=submit)

    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--state", default=None, help="only jobs in this state (default: any)")
    p.add_argument("--kind", default=None, help="only jobs of this kind (default: any)")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default: %(default)s)")
    p.set_defaults(func=jobs)

    p = sub.add_parser("job", help="a job's tasks and their states")
    p.add_argument("id", help="the job's id")
    p.set_defaults(func=job)

    p = sub.add_parser("logs", help="a job's task logs")
    p.add_argument("id", help="the job's id")
    p.add_argument("task", nargs="?", default=None, help="one task's name (default: every task)")
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new logs until the job ends"
    )
    p.set_defaults(func=logs)

    p = sub.add_parser("cancel", help="cancel a job that has not finished")
    p.add_argument("id", help="the job's id")
    p.set_defaults(func=cancel)

    p = sub.add_parser("deployments", help="list model deployments and their instances")
    p.set_defaults(func=deployments)

    p = sub.add_parser("status", help="the health of the `deepflow up` running on this machine")
    p.set_defaults(func=status)

    p = sub.add_parser("down", help="stop the `deepflow up` running on this machine")
    p.set_defaults(func=down)

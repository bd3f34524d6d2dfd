"""Operators for the attempt-process tests: they sit in C calls, ignore SIGTERM, die, start
children, print, log and use the store. Registered on import (a ``DEEPFLOW_OPERATORS``
module: tests/workers import it, the integration platform's workers load it by name)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from deepflow.dag.operators import Operator, OperatorFailed, is_registered, register
from deepflow.store import get_database


def _write_pid(args: dict[str, Any]) -> None:
    """Write this process's pid to args.pid_path (atomically: a reader never sees half)."""
    path = Path(args["pid_path"])
    path.with_suffix(".tmp").write_text(str(os.getpid()))
    path.with_suffix(".tmp").rename(path)


def read_pid(path: Path, timeout_s: float = 60) -> int:
    """The pid an operator wrote with ``_write_pid``, once it has started."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, "the operator never started"
        time.sleep(0.02)
    return int(path.read_text())


def _start_children(args: dict[str, Any]) -> None:
    """Start two ``sleep`` processes: one in the attempt's process group, one in a session
    of its own (as ``deploy.launch_replica`` starts its daemon); their pids to a file."""
    grouped = subprocess.Popen(["sleep", "300"])
    detached = subprocess.Popen(["sleep", "300"], start_new_session=True)
    Path(args["children_path"]).write_text(f"{grouped.pid} {detached.pid}")


def _c_sleep(args: dict[str, Any]) -> dict[str, Any]:
    """Sleep args.seconds in one C call (time.sleep), after writing the pid."""
    if "children_path" in args:
        _start_children(args)
    if args.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL can stop it now
    _write_pid(args)
    time.sleep(float(args["seconds"]))
    return {"slept": args["seconds"]}


def _report(args: dict[str, Any]) -> dict[str, Any]:
    """Print, log and write below Python (fd 1 and a child process), then return the pid
    and what it was given; fails with args.fail."""
    print(f"print from {args.get('tag')}")
    logging.getLogger("stop_operators").warning("record from %s", args.get("tag"))
    os.write(1, f"fd write from {args.get('tag')}\n".encode())
    subprocess.run(["sh", "-c", "echo child process output"], check=True)
    if args.get("fail"):
        raise OperatorFailed(f"planned failure of {args.get('tag')}")
    return {"pid": os.getpid(), "context": args.get("context")}


def _die(args: dict[str, Any]) -> None:
    print("about to die", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _exit(args: dict[str, Any]) -> None:
    sys.exit(int(args.get("code", 3)))


def _query(args: dict[str, Any]) -> dict[str, Any]:
    """Use the store from inside the attempt: a connection of the attempt's own."""
    with get_database(args["database_url"]).transaction() as session:
        backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    return {"backend_pid": backend}


def _unpicklable(args: dict[str, Any]) -> Any:
    return lambda: None


OPERATORS = (
    Operator("test.c_sleep", _c_sleep, description="Sleeps in one C call."),
    Operator("test.report", _report, description="Prints, logs, returns its pid."),
    Operator("test.report_context", _report, takes_context=True, description="With context."),
    Operator("test.die", _die, description="SIGKILLs its own process."),
    Operator("test.exit", _exit, description="Calls sys.exit."),
    Operator("test.query", _query, description="Queries the store."),
    Operator("test.unpicklable", _unpicklable, description="Returns a lambda."),
)
for _op in OPERATORS:
    if not is_registered(_op.name):
        register(_op)

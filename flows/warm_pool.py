"""Warm flow-run processes: each job's flow run starts in a process that has already imported
Prefect, our flows, the store and Celery, and connected to the database and the broker.

A flow run in a fresh interpreter spends most of its first two seconds importing. Here
``size`` processes are made ahead of time, each forked from a fork server that imported
everything once (``multiprocessing``'s ``forkserver`` context with those modules preloaded),
so a new one costs a fork and a connection, not seconds of imports competing with the jobs
already running. Each waits on a pipe for exactly one flow run, runs it the way Prefect's
documentation runs a flow run by hand (``prefect.flow_engine.run_flow`` inside
``prefect.engine.handle_engine_signals``) and exits: every flow run still has a process of
its own, which the worker can kill. A replacement is made in the background as soon as one
is taken. Only public names of Prefect are used (``tests/test_prefect_public_api.py``).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import cloudpickle

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

log = logging.getLogger(__name__)


PRELOAD = ["deepflow.flows.warm_pool", "deepflow.flows.registry", "prefect.flow_engine"]
"""Imported once by the fork server; every warm process starts with them loaded."""

BUSY_GRACE_S = 5.0
"""How long a stopping worker waits for flow runs still running before it kills them."""
OWNER_CHECK_S = 1.0
"""How often an idle warm process checks that the worker that made it is still alive. Its
parent is the fork server, not the worker, so the kernel's parent-death signal cannot tell it;
a worker killed outright would otherwise leave its warm processes (and their database and
broker connections) behind."""


def _child(conn: multiprocessing.connection.Connection, owner: int) -> None:
    """A warm process: import everything and connect (database, broker), then run the one
    flow run it is handed by the worker ``owner``."""
    from deepflow.flows.jobs import warm_up
    from deepflow.procutil import freeze_heap, signal_alive

    try:
        warm_up()
    except Exception:  # the run itself will report what is unreachable
        log.warning("warming up a flow-run process failed", exc_info=True)
    freeze_heap()
    try:
        while not conn.poll(OWNER_CHECK_S):
            if not signal_alive(owner):
                return
        payload = conn.recv_bytes()
    except (EOFError, OSError):  # the pool closed, or the worker died
        return
    flow_name, flow_run, env = cloudpickle.loads(payload)
    run_flow_run(flow_name, flow_run, env)


def run_flow_run(flow_name: str, flow_run: FlowRun, env: dict[str, str]) -> None:
    """Run ``flow_run`` of our flow ``flow_name`` in this process, under ``env``.

    The process's Prefect settings were read from the worker's environment at fork time; the
    flow run's environment is the worker's plus the run's own ``PREFECT__*`` identifiers, so
    settings are rebuilt only when the run's job variables change a real setting."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import run_flow
    from prefect.settings import Settings

    from deepflow.flows.registry import BY_FLOW_NAME

    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    os.environ.update(changed)
    flow = BY_FLOW_NAME[flow_name]
    with handle_engine_signals(flow_run.id):
        if any(k.startswith("PREFECT_") and not k.startswith("PREFECT__") for k in changed):
            profile = get_settings_context().profile
            with SettingsContext(profile=profile, settings=Settings()):
                run_flow(flow, flow_run=flow_run)
        else:
            run_flow(flow, flow_run=flow_run)


class WarmPool:
    """Keeps ``size`` warm processes ready; ``start`` hands one a flow run."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._lock = threading.Lock()
        self._idle: list[tuple[BaseProcess, multiprocessing.connection.Connection]] = []
        self._closed = False
        self._owner = os.getpid()
        self._busy: list[BaseProcess] = []
        """Processes handed a flow run (pruned as they exit)."""

    def fill(self) -> None:
        """Make processes until ``size`` are idle (they connect in the background)."""
        with self._lock:
            self._idle = [(p, c) for p, c in self._idle if p.is_alive()]
            while not self._closed and len(self._idle) < self.size:
                self._idle.append(self._make())

    def _make(self) -> tuple[BaseProcess, multiprocessing.connection.Connection]:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_child, args=(theirs, self._owner), name="deepflow-flow-run"
        )
        process.start()
        theirs.close()
        return process, ours

    def _take(self) -> tuple[BaseProcess, multiprocessing.connection.Connection]:
        with self._lock:
            while self._idle:
                process, conn = self._idle.pop(0)
                if process.is_alive():
                    return process, conn
                conn.close()
            return self._make()  # none idle: a fresh fork still beats nothing

    def start(self, flow_name: str, flow_run: FlowRun, env: dict[str, str]) -> BaseProcess:
        """A started process running ``flow_run`` of the flow named ``flow_name``."""
        process, conn = self._take()
        conn.send_bytes(cloudpickle.dumps((flow_name, flow_run, env)))
        conn.close()
        with self._lock:
            self._busy = [p for p in self._busy if p.is_alive()] + [process]
        if self.size:
            threading.Thread(target=self.fill, name="warm-pool-fill", daemon=True).start()
        return process

    def close(self, busy_grace_s: float = BUSY_GRACE_S) -> None:
        """Idle processes see their pipe close and exit. Flow runs still running get
        ``busy_grace_s`` to end, then SIGKILL: the interpreter would otherwise wait for them at
        exit, for ever when their platform is gone (an orphaned worker was seen doing so).
        Not SIGTERM: that ends a run as cancelled in Prefect, and so its job, and stopping
        the worker must not cancel jobs."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy, self._busy = self._busy, []
        for process, conn in idle:
            conn.close()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        deadline = time.monotonic() + busy_grace_s
        for process in busy:
            process.join(timeout=max(deadline - time.monotonic(), 0))
            if process.is_alive():
                log.warning("flow-run process %s still running at shutdown: killed", process.pid)
                process.kill()
                process.join(timeout=5)

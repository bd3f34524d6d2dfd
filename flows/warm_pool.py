"""Warm flow-run processes: each job's flow run starts in a process that has already imported
Prefect, our flows, the store and Celery, and connected to the database and the broker.

Prefect's runner starts every flow run of a served flow in a fresh spawned process
(``run_flow_in_subprocess``), which spends most of its first two seconds importing. Here
``size`` processes are made ahead of time, each forked from a fork server that imported
everything once (``multiprocessing``'s ``forkserver`` context with those modules
preloaded), so a new one costs a fork and a connection, not seconds of imports competing
with the jobs already running. Each waits on a pipe for exactly one flow run, runs it the
way Prefect's own child does (control channel, settings from the environment, engine
signal handling) and exits: every flow run still has a process of its own. The runner gets
a real ``multiprocessing`` process, so its cancellation, kill and exit-code handling are
unchanged; a replacement is made in the background as soon as one is taken.

Prefect's ``DirectSubprocessStarter`` looks ``run_flow_in_subprocess`` up in its module on
every start ("patch the module to override", its docstring says); ``install`` does that. The
hook is Prefect-internal, which is why ``prefect`` is pinned below 3.9 and
``tests/workers/test_warm_pool.py`` checks the runner really uses it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from contextlib import AbstractContextManager, nullcontext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import cloudpickle

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.client.schemas.objects import FlowRun

log = logging.getLogger(__name__)


PRELOAD = ["deepflow.flows.warm_pool", "deepflow.flows.deployments", "prefect.flow_engine"]
"""Imported once by the fork server; every warm process starts with them loaded."""


def _child(conn: multiprocessing.connection.Connection) -> None:
    """A warm process: import everything and connect (database, broker), then run the one
    flow run it is handed."""
    from prefect.flow_engine import run_flow

    import deepflow.flows.deployments  # noqa: F401  (the imports are the point)
    from deepflow.flows.jobs import warm_up
    from deepflow.procutil import freeze_heap

    try:
        warm_up()
    except Exception:  # the run itself will report what is unreachable
        log.warning("warming up a flow-run process failed", exc_info=True)
    freeze_heap()
    try:
        payload = conn.recv_bytes()
    except (EOFError, OSError):  # the pool closed, or the runner died
        return
    flow, flow_run, env, context = cloudpickle.loads(payload)
    _run_like_prefect(run_flow, flow, flow_run, env, context)


def _run_like_prefect(
    run_flow: Any, flow: Flow[..., Any], flow_run: FlowRun, env: dict[str, str | None], context: Any
) -> None:
    """What Prefect's own flow-run child does, after its imports."""
    import asyncio

    from prefect._internal.control_listener import configure_from_env
    from prefect.context import SettingsContext, get_settings_context
    from prefect.flow_engine import handle_engine_signals
    from prefect.settings.models.root import Settings

    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    os.environ["PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS"] = "false"
    configure_from_env()  # consumes the control-channel port and token
    settings: AbstractContextManager[Any] = nullcontext()
    if any(k.startswith("PREFECT_") and not k.startswith("PREFECT__") for k in env):
        # a setting changed: build settings again (slow: hundreds of pydantic models)
        profile = get_settings_context().profile
        settings = SettingsContext(profile=profile, settings=Settings())
    with settings, handle_engine_signals(flow_run.id):
        result = run_flow(flow, flow_run=flow_run, context=context)
        if asyncio.iscoroutine(result):
            asyncio.run(result)


class WarmPool:
    """Keeps ``size`` warm processes ready; ``start_flow_run`` hands one a flow run."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        self._lock = threading.Lock()
        self._idle: list[tuple[BaseProcess, multiprocessing.connection.Connection]] = []
        self._closed = False

    def fill(self) -> None:
        """Make processes until ``size`` are idle (they connect in the background)."""
        with self._lock:
            self._idle = [(p, c) for p, c in self._idle if p.is_alive()]
            while not self._closed and len(self._idle) < self.size:
                self._idle.append(self._make())

    def _make(self) -> tuple[BaseProcess, multiprocessing.connection.Connection]:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(target=_child, args=(theirs,), name="deepflow-flow-run")
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

    def start_flow_run(
        self,
        flow: Flow[..., Any],
        flow_run: FlowRun | None = None,
        env: dict[str, str | None] | None = None,
        **_: Any,
    ) -> BaseProcess:
        """Same contract as Prefect's ``run_flow_in_subprocess``: a started process running
        ``flow_run``."""
        from prefect.context import serialize_context

        process, conn = self._take()
        context = serialize_context()
        # The warm process has settings of its own, from the same environment (and builds
        # them again if the run's environment changes one). Hydrating the runner's would
        # rebuild hundreds of pydantic models: a third of a second before every flow run.
        context.pop("settings_context", None)
        conn.send_bytes(cloudpickle.dumps((flow, flow_run, dict(env or {}), context)))
        conn.close()
        threading.Thread(target=self.fill, name="warm-pool-fill", daemon=True).start()
        return process

    def close(self) -> None:
        """Idle processes see their pipe close and exit."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for process, conn in idle:
            conn.close()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def install(pool: WarmPool) -> None:
    """Make Prefect's runner start flow runs of served flows through ``pool``."""
    from prefect.runner import _starter_direct

    _starter_direct.run_flow_in_subprocess = pool.start_flow_run  # type: ignore[assignment]

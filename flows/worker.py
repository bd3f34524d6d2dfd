"""The ``deepflow`` Prefect worker: runs our job-kind flow runs in processes forked ahead of time.

Prefect's public extension point for how a flow run starts is the worker
(``prefect.workers.base.BaseWorker``): a work-pool type with its own job configuration, a poll
of its pool, states proposed for each run, cancellation and crash reporting, and a place in
Prefect's UI (the pool, the worker, its runs). This one adds what a job platform needs on top:

- a flow run starts in a warm process (``deepflow.flows.warm_pool``), not a fresh interpreter;
- a run starts when Prefect announces it, and a cancelled run's process is stopped
  (``deepflow.flows.wakeup``), with polls as the fallback for both;
- every kind's deployment is applied in the pool at start-up (``deepflow.flows.registry``).

``deepflow prefect-worker`` runs it; docs/prefect-worker.md says why a worker and not
Prefect's runner or a job-driver service of our own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from multiprocessing.process import BaseProcess
from uuid import UUID

import anyio
import anyio.abc
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import (
    InfrastructureNotAvailable,
    InfrastructureNotFound,
    ObjectAlreadyExists,
)
from prefect.states import Cancelled
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)

from deepflow.flows.registry import BY_FLOW_NAME, apply_deployments
from deepflow.flows.wakeup import follow_pool_events
from deepflow.flows.warm_pool import WarmPool

log = logging.getLogger(__name__)

WORK_POOL = "deepflow"
"""The work pool every job-kind deployment belongs to."""

CANCEL_GRACE_S = 10.0
"""A cancelled run's process gets this long after SIGTERM before SIGKILL."""

CANCELLING_POLL_S = 10.0
"""How often the worker asks which of its running runs are being cancelled (the fallback for a
lost Cancelling event)."""

FLOW_NAME_LABEL = "prefect.io/flow-name"
"""The job configuration's label naming the run's flow (set by Prefect for every run)."""


class DeepflowJobConfiguration(BaseJobConfiguration):
    """What a flow run needs: its environment (Prefect's settings and the run's ids)."""


class DeepflowVariables(BaseVariables):
    """A deployment may set environment variables (``env``) for its runs; nothing else."""


class DeepflowWorkerResult(BaseWorkerResult):
    """The flow-run process's exit code and pid."""


class DeepflowWorker(BaseWorker[DeepflowJobConfiguration, DeepflowVariables, DeepflowWorkerResult]):
    type = "deepflow"
    job_configuration = DeepflowJobConfiguration
    job_configuration_variables = DeepflowVariables

    def __init__(self, *, warm: int = 1, limit: int | None = None) -> None:
        super().__init__(
            work_pool_name=WORK_POOL,
            name=f"deepflow {socket.gethostname()}:{os.getpid()}",
            limit=limit,
        )
        self.pool = WarmPool(warm)
        self.running: dict[UUID, FlowRunProcess] = {}
        """Flow run id -> its process (what a Cancelling event names)."""
        self.cancelled: set[UUID] = set()

    async def run(
        self,
        flow_run: FlowRun,
        configuration: DeepflowJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> DeepflowWorkerResult:
        """Hand the run to a warm process and wait for that process to exit."""
        flow_name = configuration.labels.get(FLOW_NAME_LABEL) or await self._flow_name(flow_run)
        if flow_name not in BY_FLOW_NAME:
            raise ValueError(f"flow {flow_name!r} is not one of DeepFlow's job-kind flows")
        env = {k: v for k, v in configuration.env.items() if v is not None}
        started = await anyio.to_thread.run_sync(self.pool.start, flow_name, flow_run, env)
        process = FlowRunProcess(started)
        pid = process.pid
        self.running[flow_run.id] = process
        if task_status is not None:
            task_status.started(pid)
        try:
            await process.exited()
        finally:
            self.running.pop(flow_run.id, None)
        if flow_run.id in self.cancelled:  # stopped on purpose: cancelled, not crashed
            self.cancelled.discard(flow_run.id)
            message = "cancelled through Prefect; the worker stopped its process"
            await self.client.set_flow_run_state(
                flow_run.id, Cancelled(message=message), force=True
            )
            return DeepflowWorkerResult(status_code=0, identifier=str(pid))
        return DeepflowWorkerResult(status_code=process.exitcode, identifier=str(pid))

    async def cancel(self, flow_run_id: UUID) -> None:
        """Stop the process of a run being cancelled: SIGTERM (Prefect's engine raises in the
        flow, which cancels the job), SIGKILL after ``CANCEL_GRACE_S``."""
        process = self.running.get(flow_run_id)
        if process is None or flow_run_id in self.cancelled:
            return
        self.cancelled.add(flow_run_id)
        await process.stop(CANCEL_GRACE_S)

    async def cancel_cancelling_runs(self) -> None:
        """The fallback for a lost Cancelling event: ask the API which running runs of this
        worker are being cancelled."""
        if not self.running:
            return
        runs = await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=list(self.running)),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
            )
        )
        for run in runs:
            await self.cancel(run.id)

    async def _flow_name(self, flow_run: FlowRun) -> str:
        return (await self.client.read_flow(flow_run.flow_id)).name

    async def kill_infrastructure(
        self,
        infrastructure_pid: str,
        configuration: DeepflowJobConfiguration,
        grace_seconds: int = 30,
    ) -> None:
        """Cancel a run: SIGTERM its process (Prefect's engine ends the run), SIGKILL after
        ``grace_seconds``. Only processes this worker started are touched."""
        pid = int(infrastructure_pid)
        process = next((p for p in self.running.values() if p.pid == pid), None)
        if process is None:
            raise InfrastructureNotAvailable(
                f"process {infrastructure_pid} is not a flow run of this worker"
            )
        if not process.alive:
            raise InfrastructureNotFound(f"process {infrastructure_pid} has exited")
        await process.stop(grace_seconds)


class FlowRunProcess:
    """A flow run's process, watched without a thread: one future, set when the process's
    sentinel becomes readable, that any number of waiters share."""

    def __init__(self, process: BaseProcess) -> None:
        assert process.pid is not None  # a started process has one
        self.pid: int = process.pid
        self._process = process
        loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[None] = loop.create_future()
        loop.add_reader(process.sentinel, self._on_exit)
        if not process.is_alive():
            self._on_exit()

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        self._process.join()
        if not self._exit.done():
            self._exit.set_result(None)

    @property
    def alive(self) -> bool:
        return not self._exit.done()

    @property
    def exitcode(self) -> int:
        return self._process.exitcode or 0

    async def exited(self) -> None:
        await asyncio.shield(self._exit)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL if it outlives ``grace_s``."""
        if not self.alive:
            return
        os.kill(self.pid, signal.SIGTERM)
        with anyio.move_on_after(grace_s):
            await self.exited()
        if self.alive:
            self._process.kill()


async def ensure_work_pool() -> str:
    """Create our work pool if it is missing; returns its id."""
    async with get_client() as client:
        with contextlib.suppress(ObjectAlreadyExists):  # another worker made it first
            await client.create_work_pool(
                WorkPoolCreate(
                    name=WORK_POOL,
                    type=DeepflowWorker.type,
                    base_job_template=DeepflowWorker.get_default_base_job_template(),
                )
            )
        return str((await client.read_work_pool(WORK_POOL)).id)


def run_worker(limit: int | None = None, warm: int = 1) -> None:
    """Apply the deployments and run flow runs until stopped, each in one of ``warm``
    pre-imported processes (0: forked from the preloaded fork server on demand)."""
    worker = DeepflowWorker(warm=warm, limit=limit)
    # SIGTERM (how `deepflow up` and service managers stop a process) ends the worker like
    # Ctrl-C, so the warm processes are closed rather than orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        worker.pool.fill()
        asyncio.run(_run(worker))
    finally:
        worker.pool.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _run(worker: DeepflowWorker) -> None:
    pool_id = await ensure_work_pool()
    await apply_deployments(WORK_POOL)
    stopping = asyncio.Event()
    wakeup = asyncio.create_task(_wake_when_set_up(worker, UUID(pool_id), stopping))
    try:
        await worker.start()
    finally:
        stopping.set()
        wakeup.cancel()


async def _wake_when_set_up(worker: DeepflowWorker, pool_id: UUID, stopping: asyncio.Event) -> None:
    while not worker.is_setup:
        await asyncio.sleep(0.05)
    fallback = asyncio.create_task(_cancel_cancelling_runs(worker, stopping))
    try:
        await follow_pool_events(pool_id, worker.get_and_submit_flow_runs, worker.cancel, stopping)
    finally:
        fallback.cancel()


async def _cancel_cancelling_runs(worker: DeepflowWorker, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        await asyncio.sleep(CANCELLING_POLL_S)
        try:
            await worker.cancel_cancelling_runs()
        except Exception:  # the next pass tries again
            log.warning("checking for cancelled flow runs failed", exc_info=True)

"""The ``deepflow`` Prefect worker: runs our job-kind flow runs in processes forked ahead of time.

Prefect's public extension point for how a flow run starts is the worker
(``prefect.workers.base.BaseWorker``): a work-pool type with its own job configuration, a poll
of its pool, states proposed for each run, cancellation and crash reporting, and a place in
Prefect's UI (the pool, the worker, its runs). This one adds what a job platform needs on top:

- a flow run starts in a warm process (``deepflow.flows.warm_pool``), not a fresh interpreter;
- a run starts when Prefect announces it (``deepflow.flows.wakeup``), the poll as fallback;
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
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import (
    InfrastructureNotAvailable,
    InfrastructureNotFound,
    ObjectAlreadyExists,
)
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)

from deepflow.flows.registry import BY_FLOW_NAME, apply_deployments
from deepflow.flows.wakeup import poll_when_scheduled
from deepflow.flows.warm_pool import WarmPool

log = logging.getLogger(__name__)

WORK_POOL = "deepflow"
"""The work pool every job-kind deployment belongs to."""

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
        self.processes: dict[int, BaseProcess] = {}

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
        process = await anyio.to_thread.run_sync(self.pool.start, flow_name, flow_run, env)
        pid = process.pid
        assert pid is not None  # a started process has one
        self.processes[pid] = process
        if task_status is not None:
            task_status.started(pid)
        try:
            await _exited(process)
        finally:
            self.processes.pop(pid, None)
        return DeepflowWorkerResult(status_code=process.exitcode or 0, identifier=str(pid))

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
        process = self.processes.get(int(infrastructure_pid))
        if process is None:
            raise InfrastructureNotAvailable(
                f"process {infrastructure_pid} is not a flow run of this worker"
            )
        if not process.is_alive():
            raise InfrastructureNotFound(f"process {infrastructure_pid} has exited")
        os.kill(int(infrastructure_pid), signal.SIGTERM)
        with anyio.move_on_after(grace_seconds):
            await _exited(process)
        if process.is_alive():
            process.kill()


async def _exited(process: BaseProcess) -> None:
    """Wait, without a thread, until ``process`` exits (its sentinel becomes readable)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(process.sentinel, lambda: done.done() or done.set_result(None))
    try:
        if process.is_alive():
            await done
    finally:
        loop.remove_reader(process.sentinel)
    process.join()


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
    worker.pool.fill()
    try:
        asyncio.run(_run(worker))
    finally:
        worker.pool.close()


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
    await poll_when_scheduled(pool_id, worker.get_and_submit_flow_runs, stopping)

"""Our Prefect deployments: one per job kind, served by a Prefect runner process.

``deepflow flows serve`` registers them with the Prefect server and executes their flow
runs (Prefect's ``serve``: no work pool or Prefect worker needed). Each deployment is
named ``deepflow-<kind>/default``; our API starts flow runs of it, and so can Prefect's
API, UI or a schedule.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import Flow
from prefect.runner import Runner

from deepflow.dispatch import DEPLOYMENT
from deepflow.flows.batch import batch_job
from deepflow.flows.dag import dag_job
from deepflow.flows.deploy import deploy_job
from deepflow.flows.finetune import finetune_job
from deepflow.flows.wakeup import submit_when_scheduled
from deepflow.flows.warm_pool import WarmPool, install

FLOWS: dict[str, Flow[..., Any]] = {
    "dag": dag_job,
    "deploy": deploy_job,
    "finetune": finetune_job,
    "batch": batch_job,
}


def serve_all(limit: int | None = None, warm: int = 1) -> None:
    """Register every kind's deployment and run their flow runs until stopped, each in one
    of ``warm`` pre-imported processes (0: Prefect's own cold start).

    ``Runner.add_flow``, not ``serve(*deployments)``: a runner given only deployments starts
    each flow run as ``python -m prefect.engine``, which loads the flow from "storage" again;
    given the flow object, it starts the run directly, which ``warm_pool`` speeds up further.
    New flow runs start when Prefect announces them (``flows.wakeup``), not at the next poll.
    """
    pool = WarmPool(warm)
    if warm:
        install(pool)
        pool.fill()
    try:
        asyncio.run(_serve(limit))
    finally:
        pool.close()


async def _serve(limit: int | None) -> None:
    runner = Runner(limit=limit)
    for flow in FLOWS.values():
        await runner.aadd_flow(flow, name=DEPLOYMENT)
    wakeup = asyncio.create_task(submit_when_scheduled(runner))
    try:
        await runner.start()
    finally:
        wakeup.cancel()

"""The ``pipeline`` job kind's flow, and scheduled post-training pipelines.

A pipeline run fine-tunes a served model, scores it against the version it serves, and
promotes and rolls it out only when its held-out loss is lower (``dag.kinds.PipelineSpec``).
``schedule_pipeline`` makes one a Prefect deployment of this flow, named by the user, with a
cron schedule and the run's spec as its parameters: Prefect's scheduler starts its runs, its UI
shows them, and its API (``run_deployment``) starts one at any time; each run creates its job in
our store like any flow run started from Prefect (``flows.jobs``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import flow
from prefect.deployments.runner import EntrypointType
from prefect.states import State

from deepflow import dag
from deepflow.dispatch import flow_name
from deepflow.flows.jobs import run_job_flow


@flow(name=flow_name("pipeline"), persist_result=False, log_prints=True)
def pipeline_job(
    job_id: str | None = None, spec: dict[str, Any] | None = None, tenant: str = "default"
) -> State[Any] | dict[str, Any] | None:
    """Pass ``job_id`` (our API does), or ``spec`` and ``tenant`` (Prefect's API, a schedule)."""
    return run_job_flow("pipeline", job_id, spec, tenant)


async def schedule_pipeline(
    name: str, cron: str, spec: dict[str, Any], tenant: str, work_pool: str
) -> str:
    """Create (or update) the Prefect deployment ``deepflow-pipeline/<name>`` that runs
    ``spec`` for ``tenant`` on ``cron``; returns its id. The spec is checked first (a
    DagError names the field)."""
    dag.plan_user_job("pipeline", spec)
    deployment = await pipeline_job.ato_deployment(
        name=name,
        work_pool_name=work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        cron=cron,
        parameters={"spec": spec, "tenant": tenant},
        description=f"post-training pipeline of {spec['model']} for {tenant}",
    )
    return str(await deployment.aapply())


def schedule_on(api_url: str, name: str, cron: str, spec: dict[str, Any], tenant: str) -> str:
    """``schedule_pipeline`` in our work pool on the Prefect server at ``api_url`` (the CLI's
    ``deepflow pipelines schedule``)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deepflow.flows.worker import WORK_POOL

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(schedule_pipeline(name, cron, spec, tenant, WORK_POOL))

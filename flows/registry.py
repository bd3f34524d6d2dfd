"""The job-kind flows and their Prefect deployments, all in the ``deepflow`` work pool.

One flow per job kind; each has one deployment, ``deepflow-<kind>/default``, in our work pool,
so anything that starts a flow run of it (our API, Prefect's API or UI, a schedule) is
picked up by a ``deepflow`` worker (``deepflow.flows.worker``).
"""

from __future__ import annotations

from typing import Any

from prefect import Flow
from prefect.deployments.runner import EntrypointType

from deepflow.dispatch import DEPLOYMENT
from deepflow.flows.batch import batch_job
from deepflow.flows.dag import dag_job
from deepflow.flows.deploy import deploy_job
from deepflow.flows.finetune import finetune_job
from deepflow.flows.pipeline import pipeline_job

FLOWS: dict[str, Flow[..., Any]] = {
    "dag": dag_job,
    "deploy": deploy_job,
    "finetune": finetune_job,
    "batch": batch_job,
    "pipeline": pipeline_job,
}
"""Job kind -> its flow."""

BY_FLOW_NAME: dict[str, Flow[..., Any]] = {f.name: f for f in FLOWS.values()}
"""Flow name (as Prefect's API reports it) -> its flow: how a worker finds what to run."""


async def apply_deployments(work_pool: str) -> list[str]:
    """Create or update every kind's deployment in ``work_pool``; returns their ids.

    Applying keeps a deployment's id, its schedules and its runs: workers restarting or
    several workers starting at once converge on the same rows."""
    ids = []
    for flow in FLOWS.values():
        deployment = await flow.ato_deployment(
            name=DEPLOYMENT,
            work_pool_name=work_pool,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        ids.append(str(await deployment.aapply()))
    return ids

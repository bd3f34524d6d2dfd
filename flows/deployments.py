"""Our Prefect deployments: one per job kind, served by a Prefect runner process.

``deepflow flows serve`` registers them with the Prefect server and executes their flow
runs (Prefect's ``serve``: no work pool or Prefect worker needed). Each deployment is
named ``deepflow-<kind>/default``; our API starts flow runs of it, and so can Prefect's
API, UI or a schedule.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, serve

from deepflow.dispatch import DEPLOYMENT
from flows.batch import batch_job
from flows.dag import dag_job
from flows.finetune import finetune_job
from flows.serve import serve_job

FLOWS: dict[str, Flow[..., Any]] = {
    "dag": dag_job,
    "serve": serve_job,
    "finetune": finetune_job,
    "batch": batch_job,
}


def serve_all(limit: int | None = None) -> None:
    """Register every kind's deployment and run their flow runs until stopped."""
    deployments = [f.to_deployment(name=DEPLOYMENT) for f in FLOWS.values()]
    serve(*deployments, limit=limit, print_starting_message=False)  # type: ignore[arg-type]

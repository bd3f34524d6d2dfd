"""The ``finetune`` job kind's flow.

Validates data, trains, evaluates and registers the
fine-tuned weights.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import State

from deepflow.dispatch import flow_name
from deepflow.flows.jobs import run_job_flow


@flow(name=flow_name("finetune"), persist_result=False, log_prints=True)
def finetune_job(
    job_id: str | None = None, spec: dict[str, Any] | None = None, tenant: str = "default"
) -> State[Any] | dict[str, Any] | None:
    """Pass ``job_id`` (our API does), or ``spec`` and ``tenant`` (Prefect's API, a schedule)."""
    return run_job_flow("finetune", job_id, spec, tenant)

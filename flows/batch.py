"""The ``batch`` job kind's flow.

Splits an input file, runs each shard through an engine and
merges the results.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import State

from deepflow.dispatch import flow_name
from deepflow.flows.jobs import run_job_flow


@flow(name=flow_name("batch"), persist_result=False, log_prints=True)
def batch_job(
    job_id: str | None = None, spec: dict[str, Any] | None = None, tenant: str = "default"
) -> State[Any] | dict[str, Any] | None:
    """Pass ``job_id`` (our API does), or ``spec`` and ``tenant`` (Prefect's API, a schedule)."""
    return run_job_flow("batch", job_id, spec, tenant)

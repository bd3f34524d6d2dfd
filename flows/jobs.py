"""What every job-kind flow does: find or create its job, then drive its DAG.

A flow run started by our API gets ``job_id``. One started from Prefect's own API, UI or a
schedule gets ``spec`` (and ``tenant``) instead and creates its job in our store, keyed by
the flow run's id so a retried flow run finds the same job.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from prefect import get_run_logger
from prefect.context import get_run_context
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled, State
from sqlalchemy import select

from deepflow import dag, store
from deepflow.config import Settings
from deepflow.dag import operators
from deepflow.flows.driver import JobDriver, final_state, route_by_queue_parameter
from deepflow.workers.app import broker_epoch, make_app
from deepflow.workers.prefect_celery import CeleryTaskRunner


def create_job_for_flow_run(
    db: store.Database, kind: str, spec: dict[str, Any], tenant: str, flow_run_id: str
) -> str:
    plan = dag.plan_user_job(kind, spec)  # the same refusals as POST /v1/jobs
    with db.transaction() as session:
        owner = store.ensure_tenant(session, tenant)
        job, _ = store.create_job(session, owner.id, plan, kind, f"prefect-flow-run:{flow_run_id}")
        return job.id


_apps: dict[str, Celery] = {}


def _celery_app(settings: Settings) -> Celery:
    """One Celery app per broker per process: a warm flow-run process made it already."""
    if settings.broker_url not in _apps:
        _apps[settings.broker_url] = make_app(settings)
    return _apps[settings.broker_url]


def warm_up() -> None:
    """What every flow run needs before its first task, done ahead of time by a warm
    process (``flows.warm_pool``): plugins loaded, a database connection, the Celery app
    and its broker connection."""
    settings = Settings.from_env()
    operators.load_plugins(settings.operator_modules)
    db = store.get_database(settings.database_url)
    with db.transaction() as session:
        session.execute(select(1))
    with _celery_app(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)


def run_job_flow(
    kind: str, job_id: str | None, spec: dict[str, Any] | None, tenant: str
) -> State[Any] | dict[str, Any] | None:
    settings = Settings.from_env()
    operators.load_plugins(settings.operator_modules)
    db = store.get_database(settings.database_url)
    flow_run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    if job_id is None:
        if spec is None:
            raise ValueError("a job flow needs either job_id or spec")
        job_id = create_job_for_flow_run(db, kind, spec, tenant, flow_run_id)
    with db.transaction() as session:
        store.attach_flow_run(session, job_id, flow_run_id)
        driver = store.claim_driver(session, job_id)
    get_run_logger().info("driving job %s in process %d (driver %d)", job_id, os.getpid(), driver)
    runner = CeleryTaskRunner(
        _celery_app(settings), default_queue="cpu", route=route_by_queue_parameter
    )
    try:
        with runner:
            job = JobDriver(
                db, job_id, runner, driver=driver, broker_epoch=broker_epoch(settings)
            ).run()
    except TerminationSignal:  # Prefect cancelled the flow run (its UI or API): so is the job
        cancel_for_flow_run(db, job_id)
        raise
    except store.DriverSuperseded as exc:  # this run was given up for dead; a newer one drives
        return Cancelled(message=str(exc))
    return final_state(job)


def cancel_for_flow_run(db: store.Database, job_id: str) -> None:
    """Cancel the job of a flow run that Prefect cancelled (unless it finished meanwhile)."""
    with db.transaction() as session:
        job = session.get(store.Job, job_id)
        if job is not None and not job.state.is_terminal:
            store.cancel_job(session, job.tenant_id, job_id, reason="flow run cancelled in Prefect")

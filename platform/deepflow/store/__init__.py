"""The store: SQLAlchemy models and the functions that read and change them.

Callers open a transaction (``Database.transaction()``) and call these functions with its
session; the functions flush but never commit. State changes go only through
``set_*_state`` (and the task-attempt functions built on it), each writing its Event.
"""

from deepflow.store.db import Database, get_database
from deepflow.store.deployments import (
    create_deployment,
    deployment_instances,
    list_deployments,
    read_deployment,
)
from deepflow.store.drivers import (
    DriverSuperseded,
    Orphan,
    claim_driver,
    hand_over,
    orphaned_jobs,
    undriven_jobs,
)
from deepflow.store.errors import Conflict, NotFound
from deepflow.store.instances import (
    create_instance,
    list_instances,
    report_instance_load,
    stale_instances,
)
from deepflow.store.jobs import (
    JobPage,
    Pass,
    advance_job,
    attach_flow_run,
    cancel_job,
    create_job,
    drive_job,
    job_dag,
    job_edges,
    list_jobs,
    read_job,
    read_job_events,
)
from deepflow.store.leases import Reconciler, expire_leases
from deepflow.store.model_registry import list_models, read_model, register_model_version
from deepflow.store.orm import (
    ApiKey,
    Base,
    Deployment,
    DeploymentState,
    Event,
    Instance,
    InstanceState,
    Job,
    Model,
    ModelVersion,
    ModelVersionState,
    Request,
    Task,
    TaskEdge,
    Tenant,
)
from deepflow.store.tasks import (
    LeaseLost,
    claim_task,
    fail_task,
    heartbeat_task,
    queue_task,
    succeed_task,
)
from deepflow.store.tenants import (
    authenticate,
    create_api_key,
    ensure_tenant,
    revoke_api_key,
)
from deepflow.store.transitions import (
    IllegalTransition,
    set_deployment_state,
    set_instance_state,
    set_job_state,
    set_model_version_state,
    set_task_state,
)

__all__ = [
    "ApiKey",
    "Base",
    "Conflict",
    "Database",
    "Deployment",
    "DeploymentState",
    "DriverSuperseded",
    "Event",
    "IllegalTransition",
    "Instance",
    "InstanceState",
    "Job",
    "JobPage",
    "LeaseLost",
    "Model",
    "ModelVersion",
    "ModelVersionState",
    "NotFound",
    "Orphan",
    "Pass",
    "Reconciler",
    "Request",
    "Task",
    "TaskEdge",
    "Tenant",
    "advance_job",
    "attach_flow_run",
    "authenticate",
    "cancel_job",
    "claim_driver",
    "claim_task",
    "create_api_key",
    "create_deployment",
    "create_instance",
    "create_job",
    "deployment_instances",
    "drive_job",
    "ensure_tenant",
    "expire_leases",
    "fail_task",
    "get_database",
    "hand_over",
    "heartbeat_task",
    "job_dag",
    "job_edges",
    "list_deployments",
    "list_instances",
    "list_jobs",
    "list_models",
    "orphaned_jobs",
    "queue_task",
    "read_deployment",
    "read_job",
    "read_job_events",
    "read_model",
    "register_model_version",
    "report_instance_load",
    "revoke_api_key",
    "set_deployment_state",
    "set_instance_state",
    "set_job_state",
    "set_model_version_state",
    "set_task_state",
    "stale_instances",
    "succeed_task",
    "undriven_jobs",
]

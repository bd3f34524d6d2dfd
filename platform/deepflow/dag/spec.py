"""The declared shape of one task, as users write it and as job kinds generate it."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deepflow.dag.trigger_rules import TriggerRule

MAX_TASK_TIMEOUT_S = 24 * 3600.0
"""The longest a task may run; broker redelivery timeouts are set above it."""


class ResourceClass(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    NPU = "npu"


class TaskSpec(BaseModel):
    """One node of a job's DAG."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")
    operator: str = Field(min_length=1, max_length=100)
    args: dict[str, Any] = Field(default_factory=dict)
    """The operator's input (small JSON)."""
    depends_on: list[str] = Field(default_factory=list)
    trigger_rule: TriggerRule = TriggerRule.ALL_SUCCESS
    retries: int = Field(default=0, ge=0, le=100)
    retry_delay_s: float = Field(default=1.0, ge=0.0, le=3600.0)
    """Delay before the first retry; each later one waits ``retry_backoff`` times longer."""
    retry_backoff: float = Field(default=2.0, ge=1.0, le=10.0)
    max_retry_delay_s: float = Field(default=300.0, ge=0.0, le=86400.0)
    timeout_s: float = Field(default=3600.0, gt=0.0, le=MAX_TASK_TIMEOUT_S)
    priority: int = Field(default=0, ge=-1000, le=1000)
    """Higher runs first among tasks ready at the same time."""
    resource_class: ResourceClass = ResourceClass.CPU


class DagJobSpec(BaseModel):
    """The spec of a ``dag`` job: the user declares every task."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskSpec] = Field(min_length=1, max_length=5000)

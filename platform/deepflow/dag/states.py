"""Job and task states: the vocabulary shared by the DAG logic, the store and the workers."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "pending"
    """Persisted, not yet handed to the orchestrator."""
    QUEUED = "queued"
    """A flow run exists for it; no task has started."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_JOB_STATES


TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class TaskState(StrEnum):
    PENDING = "pending"
    """Waiting for its upstream tasks."""
    QUEUED = "queued"
    """Ready and handed to a worker queue."""
    RUNNING = "running"
    """A worker holds its lease."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """Failed on its last attempt."""
    SKIPPED = "skipped"
    """Its trigger rule can no longer fire because of skipped or succeeded upstreams."""
    UPSTREAM_FAILED = "upstream_failed"
    """Its trigger rule can no longer fire because upstream tasks failed."""
    UP_FOR_RETRY = "up_for_retry"
    """An attempt failed (or its lease expired) and attempts remain; waits for its backoff."""
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_TASK_STATES


TERMINAL_TASK_STATES = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.SKIPPED,
        TaskState.UPSTREAM_FAILED,
        TaskState.CANCELLED,
    }
)

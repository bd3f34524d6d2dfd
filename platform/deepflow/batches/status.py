"""A batch's OpenAI status, derived from its job's state and the phases its row records.

OpenAI's statuses and what makes each here:
``validating``: created (its file already checked), the job not yet splitting the input;
``in_progress``: the input split (``split_input``), shards running;
``finalizing``: ``merge_results`` writing the output and error files;
``completed`` / ``failed``: the job succeeded / failed;
``cancelling``: cancelled, while a shard attempt that was running has not yet stopped;
``cancelled``: cancelled, every attempt stopped;
``expired``: not done within its completion window (its job was cancelled for it).
"""

from __future__ import annotations

from typing import Literal

from deepflow.dag import JobState
from deepflow.store import BatchView

Status = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]

ENDED: frozenset[Status] = frozenset({"failed", "completed", "expired", "cancelled"})


def batch_status(view: BatchView) -> Status:
    batch = view.batch
    if view.job_state is JobState.SUCCEEDED:
        return "completed"
    if view.job_state is JobState.FAILED:
        return "failed"
    if view.job_state is JobState.CANCELLED:
        if batch.expired_at is not None:
            return "expired"
        return "cancelling" if view.stopping else "cancelled"
    if batch.finalizing_at is not None:
        return "finalizing"
    if batch.in_progress_at is not None:
        return "in_progress"
    return "validating"

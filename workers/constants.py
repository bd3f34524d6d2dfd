"""Queue names, timeouts and intervals for the workers, with the reasons for each value."""

from __future__ import annotations

from deepflow.dag import MAX_TASK_TIMEOUT_S
from deepflow.devices import VISIBLE_DEVICES_ENV as VISIBLE_DEVICES_ENV

QUEUES = ("cpu", "cuda", "npu")
"""One queue per resource class; a task's resource class names its queue."""

ACCELERATOR_QUEUES = frozenset({"cuda", "npu"})
"""Queues whose worker owns one device: concurrency 1, one process per device."""

# VISIBLE_DEVICES_ENV (how a worker process is pinned to its device) lives in the core,
# deepflow.devices: the serving operators read it too, and the core never imports workers.

VISIBILITY_TIMEOUT_S = int(MAX_TASK_TIMEOUT_S + 3600)
"""Redis redelivers an unacknowledged message after this long. It must exceed the longest
task timeout, or a long task would be delivered twice while it still runs. The lease
reconciler, not this timeout, is what recovers from a dead worker quickly."""

FILESYSTEM_POLLING_INTERVAL_S = 0.05
"""kombu's filesystem transport polls its folder; 50 ms keeps latency low at small cost."""

RESULT_EXPIRES_S = 24 * 3600
"""Task results (Prefect states) are kept a day: the flow reads each one once."""

HEARTBEATS_PER_LEASE = 3
"""A running task renews its lease this many times per lease period, so one missed beat
(a slow database commit) does not lose it."""

STOP_GRACE_S = 2.0
"""Between SIGTERM and SIGKILL. Long enough for an operator's cleanup (kill a subprocess,
write a row), short enough that a stopped attempt is gone within 5 s of its cancellation
(one lease check, ``STOP_CHECK_S``, plus this)."""

ATTEMPTS_PER_PROCESS = 500
"""An attempt process is replaced after this many attempts, which bounds what a leaking
operator can accumulate; one fork per 500 attempts costs them well under 0.1 ms each."""

STOP_CHECK_S = 1.0
"""The longest a running attempt goes without renewing (and so checking) its lease: how
soon a cancelled job's attempt is noticed. Each check is one small UPDATE of the task's row
(committed without waiting for the disk); the lease itself needs only HEARTBEATS_PER_LEASE
of them per lease period."""

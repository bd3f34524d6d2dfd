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

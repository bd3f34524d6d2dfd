"""The plain-Celery peer of bench/dag_overhead.py: a noop task on an app configured like
DeepFlow's (acks_late, prefetch 1, reject_on_worker_lost, JSON), on its own Redis db."""

from __future__ import annotations

import os

from celery import Celery

BROKER = os.environ.get("PEER_BROKER_URL", "redis://127.0.0.1:6379/9")

app = Celery("peer", broker=BROKER, backend=BROKER)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)


@app.task(name="peer.noop")
def noop(*_: object) -> None:
    return None

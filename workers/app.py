"""The Celery app: broker, result backend and the delivery guarantees the platform needs.

acks_late + reject_on_worker_lost + prefetch 1: a message is acknowledged only after its
task ran, a worker killed mid-task gives its message back, and no worker hoards messages
it cannot start. Duplicate deliveries are harmless because every attempt is fenced by its
lease in the store (``deepflow.store.tasks``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_init

from deepflow.config import Settings
from deepflow.procutil import die_with_parent
from deepflow.workers import prefect_celery
from deepflow.workers.constants import (
    FILESYSTEM_POLLING_INTERVAL_S,
    RESULT_EXPIRES_S,
    VISIBILITY_TIMEOUT_S,
)
from deepflow.workers.filesystem_transport import Transport as AtomicFilesystemTransport

log = logging.getLogger(__name__)


def filesystem_broker_options(home: Path) -> dict[str, Any]:
    """kombu's filesystem transport (messages published atomically), under DEEPFLOW_HOME/broker."""
    root = home / "broker"
    queue, control = root / "queue", root / "control"
    for folder in (queue, control):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "control_folder": str(control),
        "store_processed": False,
        "polling_interval": FILESYSTEM_POLLING_INTERVAL_S,
    }


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    app = Celery("deepflow")
    broker = settings.broker_url
    transport: type | None = None
    if broker.startswith("filesystem"):
        transport = AtomicFilesystemTransport
        transport_options = filesystem_broker_options(settings.ensure_home())
        results = settings.home / "results"
        results.mkdir(parents=True, exist_ok=True)
        backend = f"file://{results}"
    else:
        transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
        backend = broker
    app.conf.update(
        broker_url=broker,
        broker_transport=transport,
        result_backend=backend,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue="cpu",
        task_create_missing_queues=True,
        result_expires=RESULT_EXPIRES_S,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    prefect_celery.register_task(app)
    return app


def broker_epoch(settings: Settings) -> Callable[[], str | None]:
    """A reader of the broker's current life: Redis's ``run_id``, new at each start. Redis
    run without persistence loses its queues when it restarts, so a message sent in an
    earlier life is gone. None where it cannot tell (unreachable; the filesystem broker,
    whose messages are files that outlive its users)."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return lambda: None
    client = redis.Redis.from_url(
        settings.broker_url, socket_timeout=1.0, socket_connect_timeout=1.0
    )

    def read() -> str | None:
        try:
            return str(client.info("server")["run_id"])
        except redis.RedisError:
            return None

    return read


@worker_process_init.connect
def _die_with_the_worker(**_: Any) -> None:
    """A pool process dies with its parent, so a killed worker leaves no orphan running
    a task whose lease the reconciler is about to hand to someone else."""
    die_with_parent(signal.SIGKILL)

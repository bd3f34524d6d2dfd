"""Celery apps of the prefect_celery tests (`celery -A tests.workers.prefect_celery_app`).

JSON-only on purpose: the runner must work without pickle in Celery's own serializers.
`app` runs on Redis; `files_app` on kombu's filesystem transport and a file result backend
(the platform's embedded default), rooted at $PREFECT_CELERY_TEST_FILES when that is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery

from deepflow.workers.prefect_celery import register_task

REDIS_URL = os.environ.get("PREFECT_CELERY_TEST_REDIS", "redis://127.0.0.1:6379/7")
CONFIG: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": True,
    "worker_hijack_root_logger": False,
}

app = Celery("prefect_celery_test", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(CONFIG, broker_transport_options={"visibility_timeout": 3600})
register_task(app)


def make_files_app(root: Path) -> Celery:
    folders = {name: root / name for name in ("queue", "control", "results")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    files = Celery(
        "prefect_celery_files", broker="filesystem://", backend=f"file://{folders['results']}"
    )
    files.conf.update(
        CONFIG,
        broker_transport_options={
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
            "polling_interval": 0.05,
        },
    )
    register_task(files)
    return files


files_app = (
    make_files_app(Path(os.environ["PREFECT_CELERY_TEST_FILES"]))
    if os.environ.get("PREFECT_CELERY_TEST_FILES")
    else None
)

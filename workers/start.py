"""Worker start-up: ``deepflow worker --queues cuda --device 0``.

An accelerator worker serves one queue with one device and concurrency 1, pinned by its
visible-devices variable before anything can touch the device. Pool processes are forked
from a parent that never initialises CUDA (checked below), so no CUDA state is ever forked.
"""

from __future__ import annotations

import os
import sys

from deepflow.config import Settings
from deepflow.dag import operators
from deepflow.procutil import freeze_heap
from deepflow.workers.app import make_app
from deepflow.workers.constants import ACCELERATOR_QUEUES, QUEUES, VISIBLE_DEVICES_ENV


def worker_argv(
    queues: list[str], device: str | None, concurrency: int | None, loglevel: str
) -> tuple[list[str], dict[str, str]]:
    """Celery's worker arguments and the environment variables to set first."""
    unknown = [q for q in queues if q not in QUEUES]
    if unknown:
        raise ValueError(f"unknown queue(s) {unknown}: choose from {', '.join(QUEUES)}")
    env: dict[str, str] = {}
    accelerators = [q for q in queues if q in ACCELERATOR_QUEUES]
    if accelerators:
        if len(queues) != 1:
            raise ValueError("an accelerator worker serves exactly one queue (cuda or npu)")
        if concurrency not in (None, 1):
            raise ValueError("an accelerator worker runs one task at a time (concurrency 1)")
        env[VISIBLE_DEVICES_ENV[accelerators[0]]] = device or "0"
        concurrency = 1
    elif device is not None:
        raise ValueError("--device is for the cuda and npu queues")
    name = f"{'-'.join(queues)}{'-' + device if device else ''}-{os.getpid()}@%h"
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--concurrency",
        str(concurrency or 2),
        "--pool",
        "prefork",
        "--hostname",
        name,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    return argv, env


def start_worker(
    queues: list[str],
    device: str | None = None,
    concurrency: int | None = None,
    loglevel: str = "INFO",
    settings: Settings | None = None,
) -> None:
    argv, env = worker_argv(queues, device, concurrency, loglevel)
    os.environ.update(env)
    settings = settings or Settings.from_env()
    if settings.prefect_api_url:
        os.environ.setdefault("PREFECT_API_URL", settings.prefect_api_url)
    operators.load_plugins(settings.operator_modules)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before the worker forked its pool")
    app = make_app(settings)
    freeze_heap()  # before the pool forks: its children inherit the frozen imports
    app.worker_main(argv)

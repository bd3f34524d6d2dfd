"""FlowServe's HTTP daemon: one engine behind OpenAI's API (``deepflow serve MODEL_DIR``).

Kept apart from deepflow.engine, which must import without the web packages; this package
adds FastAPI, uvicorn, pydantic and prometheus_client. Names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepflow.engine.daemon.app import build_app
    from deepflow.engine.daemon.main import main, run_daemon

__all__ = ["build_app", "main", "run_daemon"]

_MODULES = {"build_app": "app", "main": "main", "run_daemon": "main"}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value
    return value

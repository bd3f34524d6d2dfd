"""Operators for the integration tests, loaded by every process via DEEPFLOW_OPERATORS."""

from __future__ import annotations

import os
import time
from typing import Any

from deepflow.dag.operators import Operator, register


def _tick(args: dict[str, Any]) -> dict[str, Any]:
    """Append "<pid> <monotonic-free wall time>" to args.path every 50 ms for args.seconds,
    so a test can see exactly when (and in which process) an attempt ran."""
    end = time.time() + float(args["seconds"])
    with open(args["path"], "a") as out:
        while time.time() < end:
            out.write(f"{os.getpid()} {time.time():.3f}\n")
            out.flush()
            time.sleep(0.05)
    return {"pid": os.getpid()}


def _fail_until(args: dict[str, Any]) -> dict[str, Any]:
    """Fail until args.path holds args.times lines, appending one per attempt."""
    with open(args["path"], "a+") as f:
        f.seek(0)
        seen = len(f.readlines())
        f.write("attempt\n")
    if seen < int(args["times"]):
        raise RuntimeError(f"planned failure {seen + 1}")
    return {"attempts": seen + 1}


register(Operator("test.tick", _tick, description="Ticks into a file for a while."))
register(Operator("test.fail_until", _fail_until, description="Fails N times, then succeeds."))

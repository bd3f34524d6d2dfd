"""Process lifetime helpers shared by the launcher and the workers."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import time

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only), so a
    killed parent leaves no orphans. Call it in the child (a pool initialiser, a preexec_fn)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        log.debug("prctl unavailable; children may outlive their parent")


def signal_alive(pid: int, sig: int = 0) -> bool:
    """Send ``sig`` (0: only look); False when no such process, or only its zombie, is left."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` has exited; True if it did within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while signal_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def freeze_heap() -> None:
    """Exempt every object allocated so far (the imports, mostly) from garbage collection.

    A process that has imported Prefect, SQLAlchemy and Celery tracks ~160k objects, and a
    full collection walks them all: ~0.1 s of a job's time, whenever enough new objects
    survive (a driver pass, a few hundred task runs). Call it once start-up is done; before
    a fork, it also keeps the children from dirtying the parent's pages."""
    gc.freeze()

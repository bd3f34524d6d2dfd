"""Ending an instance's engine daemon from the platform's side, by the pid in its row.

A daemon runs in a session of its own (``spawn``'s ``detach``), so its pid is also its
process group's id, and its environment names its instance (``INSTANCE_ENV``, set by
``deploy.launch_replica``). The environment is what makes signalling by a stored pid safe:
a daemon that died long ago may have left its number to an unrelated process (or to another
instance's daemon), and only the process whose environment names the instance is signalled.
Only daemons of this host can be reached; a row's ``host`` says where its daemon runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket

from deepflow.procutil import wait_gone

log = logging.getLogger(__name__)

INSTANCE_ENV = "DEEPFLOW_INSTANCE_ID"
KILL_WAIT_S = 5.0
"""How long ``end_daemon`` waits for a SIGKILLed daemon to be gone (its device memory free);
a process, even a stopped one, dies at once on SIGKILL unless stuck in the kernel."""


def daemon_env(instance_id: str) -> dict[str, str]:
    """The environment a daemon of ``instance_id`` starts with: the worker's, plus its name."""
    return {**os.environ, INSTANCE_ENV: instance_id}


def is_daemon_of(pid: int, instance_id: str) -> bool:
    """Whether process ``pid`` of this host is ``instance_id``'s daemon, alive (a zombie's
    environment reads empty)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:  # no such process, or not ours to look at
        return False
    return f"{INSTANCE_ENV}={instance_id}".encode() in environ.split(b"\0")


def end_daemon(instance_id: str, host: str | None, pid: int | None) -> bool:
    """SIGKILL the instance's daemon and whatever else runs in its process group, if it
    still runs on this host, and wait until it is gone; True if it was running. For an
    instance that already failed or was given up: nothing is left to drain."""
    if pid is None:
        return False
    if host != socket.gethostname():
        log.warning("instance %s: its daemon runs on %s, out of reach from here", instance_id, host)
        return False
    if not is_daemon_of(pid, instance_id):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if not wait_gone(pid, KILL_WAIT_S):
        log.warning("instance %s: daemon %d outlived SIGKILL by %gs", instance_id, pid, KILL_WAIT_S)
    log.info("instance %s: ended its daemon (pid %d)", instance_id, pid)
    return True

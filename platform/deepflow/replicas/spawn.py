"""Start an engine daemon and wait for its ready report: the launcher's half of the handshake.

The launcher makes a pipe and passes its write end down (``--ready-fd N``). The daemon
writes one ``ReadyReport`` line there once it serves, then closes it (see
``deepflow.engine.daemon.main``). A pipe rather than a file because its end is the kernel's
word that the daemon died: end-of-file arrives the moment the last writer exits, with no
polling, no stale file from an earlier run and nothing to clean up. The process's exit is
also checked on every tick, in case a grandchild inherited the pipe against the daemon's
will. The log is only read to put its tail into an error.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deepflow.engine.daemon.main import ReadyReport

POLL_S = 0.1
"""The wait's tick: how often the process's exit and the deadline are checked. (An exception
from a signal handler, the worker stopping the attempt, interrupts the wait at once.)"""
EXIT_GRACE_S = 5.0
"""After the pipe closed without a report, how long the daemon gets to exit on its own."""
LOG_TAIL_CHARS = 2000


class DaemonFailed(RuntimeError):
    """The daemon exited, timed out, or reported nonsense before it was ready; it is gone."""


@dataclass(frozen=True, slots=True)
class Spawned:
    proc: subprocess.Popen[bytes]
    ready: ReadyReport


def spawn_daemon(
    argv: Sequence[str],
    log_path: Path,
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    detach: bool = False,
    on_start: Callable[[int], object] | None = None,
) -> Spawned:
    """Run ``argv`` (a daemon command line; ``--ready-fd`` is added) with its output in
    ``log_path``, and return once it reports ready. ``detach``: its own session, so it
    outlives the caller. ``on_start`` gets the daemon's pid as soon as it runs (to record it
    before the long wait for its report). On any failure, including ``on_start``'s and the
    attempt being stopped (SIGTERM raises ``AttemptStopped`` here), the daemon is killed
    before the error propagates."""
    read_fd, write_fd = os.pipe()
    with open(read_fd, "rb", buffering=0) as pipe:
        try:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [*argv, "--ready-fd", str(write_fd)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=None if env is None else dict(env),
                    pass_fds=(write_fd,),
                    start_new_session=detach,
                )
        finally:
            os.close(write_fd)  # the daemon holds the only write end now
        try:
            if on_start is not None:
                on_start(proc.pid)
            ready = _await_report(proc, pipe.fileno(), log_path, timeout_s)
        except BaseException:
            _kill(proc, detach)
            raise
    return Spawned(proc, ready)


def _await_report(
    proc: subprocess.Popen[bytes], fd: int, log_path: Path, timeout_s: float
) -> ReadyReport:
    line = _read_line(proc, fd, log_path, timeout_s)
    if line:
        try:
            return ReadyReport.from_line(line)
        except ValueError as exc:
            raise DaemonFailed(f"the engine daemon's ready report is malformed: {exc}") from None
    try:
        status = proc.wait(timeout=EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        raise DaemonFailed(
            "the engine daemon closed its ready pipe without a report and kept running:\n"
            + log_tail(log_path)
        ) from None
    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    raise DaemonFailed(f"the engine daemon {how} before it was ready:\n{log_tail(log_path)}")


def _read_line(proc: subprocess.Popen[bytes], fd: int, log_path: Path, timeout_s: float) -> bytes:
    """The report's line, or b"" once the pipe closed or the process exited without one."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        exited = proc.poll() is not None  # before select: what it wrote before exiting is there
        readable, _, _ = select.select([fd], [], [], 0 if exited else POLL_S)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                return b""
            data += chunk
        elif exited:
            return b""
        elif time.monotonic() > deadline:
            raise DaemonFailed(
                f"the engine daemon was not ready in {timeout_s:g}s:\n{log_tail(log_path)}"
            )
    return data.partition(b"\n")[0]


def _kill(proc: subprocess.Popen[bytes], detach: bool) -> None:
    if detach:  # its own process group: take whatever it started down with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    elif proc.poll() is None:
        proc.kill()
    proc.wait()


def log_tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-LOG_TAIL_CHARS:]

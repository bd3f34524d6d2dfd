"""What runs inside an attempt process (``attempt_process`` forks it): operators, nothing else.

The process was forked from a Celery pool process, so it starts with everything imported.
It first lets go of what belongs to the worker: it forgets the inherited database
connections (``engine.dispose(close=False)``: the worker's sockets stay open for the
worker, and psycopg does not end a connection from a process that did not open it), drops
the worker's Python signal handlers (Celery's), and never runs Celery or Prefect code. It
leaves with ``os._exit``, so no atexit hook and no inherited buffer of the worker runs twice.

Then it serves: it reads one request (operator, args) from a pipe, runs the operator, and
writes one ``Outcome`` back on another pipe: the output, or the error with its traceback.
Everything it prints or logs goes to a third pipe (``attempt_log.capture_process``). SIGTERM
raises ``AttemptStopped`` wherever Python code runs, so an operator's ``finally`` and
``except BaseException`` clean up before the worker's SIGKILL follows.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import struct
import sys
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

from deepflow.dag import operators
from deepflow.procutil import die_with_parent
from deepflow.store import db as store_db
from deepflow.workers import attempt_log

HEADER = struct.Struct("!Q")
"""Every message on the request and outcome pipes: its length, then a pickle. Pickle, not
JSON: both ends are the same program (a fork), and an exception keeps its type."""


class AttemptStopped(BaseException):
    """Raised in the attempt process by SIGTERM from the worker (timed out or lease lost).
    A BaseException, so an operator's own ``except Exception`` does not swallow it."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended: the operator's output, or its error."""

    output: Any = None
    error: str | None = None
    """``"Type: message"``, as the store records it; None when the operator succeeded."""
    traceback: str = ""
    exception: bytes | None = None
    """The pickled exception when it pickles, so the worker re-raises the same type."""

    def raise_error(self) -> NoReturn:
        """Raise the operator's exception in the worker, its traceback attached as a note."""
        assert self.error is not None
        exc: BaseException | None = None
        if self.exception is not None:
            with contextlib.suppress(Exception):
                exc = pickle.loads(self.exception)
        if not isinstance(exc, Exception):
            exc = operators.OperatorFailed(self.error)
        if self.traceback:
            exc.add_note(f"In the attempt process:\n{self.traceback}")
        raise exc


def encode(message: object) -> bytes:
    body = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def decode(buffer: bytearray) -> Any | None:
    """Take the first whole message off ``buffer``; None while it is incomplete."""
    if len(buffer) < HEADER.size:
        return None
    end = HEADER.size + HEADER.unpack_from(buffer)[0]
    if len(buffer) < end:
        return None
    message = pickle.loads(buffer[HEADER.size : end])
    del buffer[:end]
    return message


def serve(
    parent: int, request_fd: int, outcome_fd: int, log_fd: int, max_attempts: int
) -> NoReturn:
    """The attempt process, from fork to ``os._exit``: up to ``max_attempts`` attempts,
    until the worker closes the request pipe, or until a signal ends it."""
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the worker died before PDEATHSIG was armed
        os._exit(1)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # the worker signals this group: what the operators start goes too
    gc.freeze()  # the inherited heap is never collected here: no copy-on-write for it
    _reset_signals()
    attempt_log.capture_process(log_fd)
    store_db.forget_inherited_connections()
    for _ in range(max_attempts):
        request = _read_message(request_fd)
        if request is None:
            break
        operator, args = request
        write_all(outcome_fd, _run(operator, args))
    os._exit(0)


def _run(operator: str, args: dict[str, Any]) -> bytes:
    try:
        outcome = Outcome(output=operators.run(operator, args))
    except AttemptStopped:
        raise  # the worker is ending this process: nothing to report
    except BaseException as exc:  # SystemExit too: the operator failed, the process serves on
        outcome = _failure(exc)
    try:
        message = encode(outcome)
    except Exception as exc:
        message = encode(_failure(TypeError(f"the output cannot be sent back: {exc}")))
    attempt_log.flush_process()  # the log reaches its pipe before the outcome reaches its own
    return message


def _failure(exc: BaseException) -> Outcome:
    text = "".join(traceback.format_exception(exc))
    print(text, end="", file=sys.stderr)  # the attempt's log keeps the traceback
    pickled = None
    with contextlib.suppress(Exception):
        pickled = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
    return Outcome(error=f"{type(exc).__name__}: {exc}", traceback=text, exception=pickled)


def _reset_signals() -> None:
    """The worker's Python signal handlers are not the attempt's: back to the defaults,
    and SIGTERM raises ``AttemptStopped``."""
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError, TypeError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, _stopped)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _stopped(signum: int, frame: object) -> None:
    raise AttemptStopped(f"stopped by the worker ({signal.Signals(signum).name})")


def _read_message(fd: int) -> Any | None:
    """The next request, blocking; None when the worker closed the pipe."""
    buffer = bytearray()
    while (message := decode(buffer)) is None:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        buffer += chunk
    return message


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of ``data`` is written (a pipe takes 64 KiB at a time)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]

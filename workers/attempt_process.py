"""Attempt processes: where operators run, so that the worker can always stop them.

Why a process: a thread cannot be stopped from outside. Raising an exception in it waits for
its next bytecode, which a long torch op, a C-level ``time.sleep`` or a blocking socket read
never reach; a process can always be killed. The Celery pool process therefore never runs an
operator: it forks an attempt process (``attempt_child.serve``), hands it the attempt, and
meanwhile keeps the lease, watches the deadline and reads the attempt's log and outcome
(``execute``). To stop an attempt it signals the attempt process's group: SIGTERM (Python
code gets ``AttemptStopped`` and cleans up), SIGKILL ``STOP_GRACE_S`` later (C code does not
return). The group holds what the operator started, unless that moved to its own session,
as ``deploy.launch_replica``'s engine daemon does in order to outlive the attempt.

Why fork: the pool process has every import loaded (operators, torch, the store), so a
forked child is ready in milliseconds, where a spawned interpreter spends seconds on
imports. It is safe because the pool process never initialises CUDA (``workers.start``
checks) and the child lets go of the worker's connections (``attempt_child``). It dies with
the worker (PDEATHSIG), so a killed worker leaves no attempt running that the lease
reconciler is about to hand to another.

Why one process serves several attempts: a fork per attempt costs far more than its
syscall. Every page the pool process or the child writes after a fork takes a copy-on-write
fault (about 2,300 and 1,000 per noop attempt). Measured on the 2-core development VM with
``tests/workers/bench_attempts --fresh``: a fresh process per attempt took 31 ms per noop
attempt (median; 31 ms of CPU), a reused one 9 ms (11 ms of CPU), the old in-thread attempt
10 ms (12 ms of CPU). The orchestration budget is 2x plain Celery, ~12 ms per task in all.
So an attempt process runs its thread's next attempt too, as the pool process used to,
until an attempt is stopped or kills it, or it has served ``ATTEMPTS_PER_PROCESS``; then the
next attempt forks a fresh one. Attempts that follow each other in one process share what
the previous ones left (module state, a CUDA context), exactly as they did in the pool
process; a stopped attempt takes its process, and whatever it left, with it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from typing import Any

from deepflow.workers import attempt_child, attempt_log
from deepflow.workers.attempt_child import Outcome
from deepflow.workers.constants import ATTEMPTS_PER_PROCESS, STOP_GRACE_S

EXIT_WAIT_S = 5.0
"""How long a process whose request pipe closed gets to exit before it is killed."""

_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR


class AttemptProcess:
    """The worker's handle on one attempt process: start attempts, wait, stop, read outcomes."""

    def __init__(self, pid: int, request_fd: int, outcome_fd: int, log_fd: int, left: int):
        self.pid, self._left = pid, left
        self._request_fd: int | None = request_fd
        self._outcome_fd = outcome_fd
        os.set_blocking(outcome_fd, False)
        self._log = attempt_log.PipeReader(log_fd)
        self._pidfd = os.pidfd_open(pid)
        self._poll = select.poll()
        for fd in (outcome_fd, log_fd, self._pidfd):
            self._poll.register(fd, _POLL_IN)
        self._buffer = bytearray()
        self._outcome: Outcome | None = None
        self._status: int | None = None

    @classmethod
    def fork(cls, max_attempts: int | None = None) -> AttemptProcess:
        """A new attempt process, for up to ``max_attempts`` (``ATTEMPTS_PER_PROCESS``)."""
        max_attempts = max_attempts or ATTEMPTS_PER_PROCESS
        request_r, request_w = os.pipe()
        outcome_r, outcome_w = os.pipe()
        log_r, log_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                _thread.process = None  # the worker's handle, not this process's
                for fd in (request_w, outcome_r, log_r):
                    os.close(fd)
                attempt_child.serve(parent, request_r, outcome_w, log_w, max_attempts)
            finally:
                os._exit(70)
        for fd in (request_r, outcome_w, log_w):
            os.close(fd)
        with contextlib.suppress(OSError):  # the child does it too; whoever comes first
            os.setpgid(pid, pid)
        return cls(pid, request_w, outcome_r, log_r, max_attempts)

    @property
    def idle(self) -> bool:
        """It can take another attempt: alive, and not at its last one served."""
        self.wait(0, until_exit=True)
        return self._status is None and self._left > 0 and self._request_fd is not None

    def begin(self, operator: str, args: dict[str, Any], log: attempt_log.AttemptLog) -> None:
        """Send it ``operators.run(operator, args)``; its output from now on goes to ``log``."""
        assert self._request_fd is not None
        self._log.log = None
        self._log.read()  # what earlier attempts' leftovers wrote since: echoed, not logged
        self._log.log = log
        self._outcome, self._left = None, self._left - 1
        attempt_child.write_all(self._request_fd, attempt_child.encode((operator, args)))

    @property
    def finished(self) -> bool:
        """The attempt's outcome has arrived, or the process has exited without one."""
        return self._outcome is not None or self._status is not None

    def wait(self, timeout_s: float, until_exit: bool = False) -> bool:
        """Read the pipes until the attempt finished (the process exited, ``until_exit``)
        or ``timeout_s`` passed; True if it did."""
        end = time.monotonic() + timeout_s
        while not (self._status is not None if until_exit else self.finished):
            left = end - time.monotonic()
            if left < 0:
                return False
            for fd, _ in self._poll.poll(int(left * 1000 + 0.999)):
                if fd == self._pidfd:
                    self._reap()
                elif fd == self._outcome_fd:
                    self._read_outcome()
                else:
                    self._read_log()
        return True

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM its process group, SIGKILL it after ``grace_s``, and reap it."""
        self._left = 0
        self._signal_group(signal.SIGTERM)
        self.wait(grace_s, until_exit=True)
        self._signal_group(signal.SIGKILL)  # also what it started that did not go with it
        self.wait(60.0, until_exit=True)

    def outcome(self) -> Outcome:
        """The attempt's outcome, once it ``finished``, with its whole log read."""
        if self._outcome is None:
            self.wait(60.0, until_exit=True)
        self._read_outcome()
        self._read_log()
        if self._outcome is not None:
            return self._outcome
        return Outcome(error=f"AttemptDied: the attempt process {_describe(self._status)}")

    def close(self) -> None:
        """End it (it exits when its request pipe closes) and release its descriptors."""
        if self._request_fd is not None:
            os.close(self._request_fd)
            self._request_fd = None
        if not self.wait(EXIT_WAIT_S, until_exit=True):
            self.stop()
        self._log.close()
        os.close(self._outcome_fd)
        os.close(self._pidfd)

    def _read_outcome(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._outcome_fd, 1 << 20):
                self._buffer += chunk
            with contextlib.suppress(KeyError):
                self._poll.unregister(self._outcome_fd)  # end of file: seen
        if self._outcome is None:
            self._outcome = attempt_child.decode(self._buffer)

    def _read_log(self) -> None:
        self._log.read()
        if self._log.eof:
            with contextlib.suppress(KeyError):
                self._poll.unregister(self._log.fd)

    def _reap(self) -> None:
        if self._status is None:
            self._status = os.waitpid(self.pid, 0)[1]
            self._poll.unregister(self._pidfd)

    def _signal_group(self, sig: int) -> None:
        # Until it is reaped, the process's pid (its group's id) cannot be reused.
        if self._status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)


class _ThreadProcess(threading.local):
    process: AttemptProcess | None = None


_thread = _ThreadProcess()
"""Each thread's attempt process. Per thread, because PDEATHSIG fires when the thread that
forked a process ends, and so that two threads never share one."""


def begin_attempt(
    operator: str, args: dict[str, Any], log: attempt_log.AttemptLog
) -> AttemptProcess:
    """Run ``operators.run(operator, args)`` in this thread's attempt process (forked now if
    there is none ready); its output goes to ``log``. Pair with ``end_attempt``."""
    process, _thread.process = _thread.process, None
    if process is not None and not process.idle:
        process.close()
        process = None
    if process is None:
        process = AttemptProcess.fork()
    try:
        process.begin(operator, args, log)
    except BrokenPipeError:  # it died since ``idle`` looked: one fresh try
        process.close()
        process = AttemptProcess.fork()
        process.begin(operator, args, log)
    return process


def end_attempt(process: AttemptProcess) -> Outcome:
    """The attempt's outcome (waiting for it if need be); the process is kept for the
    thread's next attempt if it can take one, else ended."""
    outcome = process.outcome()
    if process.idle:
        _thread.process = process
    else:
        process.close()
    return outcome


def release() -> None:
    """End this thread's idle attempt process, if it has one (tests, benchmarks)."""
    process, _thread.process = _thread.process, None
    if process is not None:
        process.close()


def _describe(status: int | None) -> str:
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    if code is None:
        return "did not exit"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code} before reporting"

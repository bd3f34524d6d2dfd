"""What one task attempt writes: its stdout/stderr and log records, bounded.

An attempt runs in its own process (``attempt_process``), so capture is whole-process and
needs no per-thread bookkeeping: the attempt's process points file descriptors 1 and 2 at a
pipe (``capture_process``), so ``print``, log records, C code and the subprocesses it starts
all land there; the worker reads the pipe into an ``AttemptLog`` (``PipeReader``) and echoes
it to its own stderr, as a thread's tee used to. Reading in the worker, not buffering in the
attempt's process, is what keeps the log of an attempt that had to be killed.

The log is bounded: its head and its tail are kept, the middle of a very long one is counted
and left out.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import sys
from collections import deque

HEAD_CHARS = 16 * 1024
TAIL_CHARS = 48 * 1024
"""At most 64 KiB of text per attempt: the start (what it set out to do) and the end (why
it stopped) matter most."""

READ_BYTES = 64 * 1024
"""One read from the pipe: a pipe's default capacity."""

RECORD_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class AttemptLog:
    """Text bounded to its first ``head`` and last ``tail`` characters."""

    def __init__(self, head: int = HEAD_CHARS, tail: int = TAIL_CHARS) -> None:
        self._head_max, self._tail_max = head, tail
        self._head: list[str] = []
        self._head_len = 0
        self._tail: deque[str] = deque()
        self._tail_len = 0
        self.dropped = 0

    def write(self, text: str) -> None:
        room = self._head_max - self._head_len
        if room > 0:
            self._head.append(text[:room])
            self._head_len += len(text[:room])
            text = text[room:]
        if not text:
            return
        self._tail.append(text)
        self._tail_len += len(text)
        while self._tail_len > self._tail_max:
            excess = self._tail_len - self._tail_max
            first = self._tail[0]
            cut = min(len(first), excess)
            if cut == len(first):
                self._tail.popleft()
            else:
                self._tail[0] = first[cut:]
            self._tail_len -= cut
            self.dropped += cut

    def text(self) -> str:
        gap = f"\n[... {self.dropped} characters left out ...]\n" if self.dropped else ""
        return "".join(self._head) + gap + "".join(self._tail)


class PipeReader:
    """The worker's end of an attempt process's output pipe (non-blocking): decoded into
    ``log`` (when there is one: an attempt is running) and echoed, as bytes, to ``echo_fd``
    (the worker's own stderr) when one is given."""

    def __init__(self, fd: int, log: AttemptLog | None = None, echo_fd: int | None = 2) -> None:
        os.set_blocking(fd, False)
        self.fd, self.log, self._echo = fd, log, echo_fd
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.eof = False

    def read(self) -> None:
        """Take whatever the pipe holds now; sets ``eof`` when every writer has closed it."""
        while not self.eof:
            try:
                chunk = os.read(self.fd, READ_BYTES)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                self._write(self._decoder.decode(b"", final=True))
                return
            self._write(self._decoder.decode(chunk))
            if self._echo is not None:
                with contextlib.suppress(OSError):  # the worker's own log is best effort
                    os.write(self._echo, chunk)

    def _write(self, text: str) -> None:
        if self.log is not None and text:
            self.log.write(text)

    def close(self) -> None:
        self.read()
        os.close(self.fd)


def capture_process(fd: int) -> None:
    """In an attempt's own process: send stdout, stderr and log records to ``fd``.

    Fresh ``sys.stdout``/``sys.stderr`` (line-buffered) replace the worker's, which may be
    Celery's logging proxies; the root logger's handlers are replaced by one that writes to
    the new stderr, so a record reaches the log once, in the format the dashboard shows.
    """
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fd > 2:
        os.close(fd)
    for name, number in (("stdout", 1), ("stderr", 2)):
        stream = open(  # noqa: SIM115  (it lives as long as the process)
            number, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
        )
        setattr(sys, name, stream)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(RECORD_FORMAT))
    root.addHandler(handler)


def flush_process() -> None:
    """Before an attempt's process exits: push what its streams still buffer into the pipe."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()

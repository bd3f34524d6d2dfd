"""Capture what one task attempt writes: log records and stdout/stderr of its thread.

A worker process may run attempts in several threads, so capture is per thread: one root
logging handler and one tee on ``sys.stdout``/``sys.stderr`` (installed once, left in place)
copy whatever the capturing thread emits into its ``AttemptLog``; other threads pass
through untouched. The log is bounded: its head and its tail are kept, the middle of a
very long one is counted and left out.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HEAD_CHARS = 16 * 1024
TAIL_CHARS = 48 * 1024
"""At most 64 KiB of text per attempt: the start (what it set out to do) and the end (why
it stopped) matter most."""


class AttemptLog:
    """Text bounded to its first ``head`` and last ``tail`` characters."""

    def __init__(self, head: int = HEAD_CHARS, tail: int = TAIL_CHARS) -> None:
        self._head_max, self._tail_max = head, tail
        self._head: list[str] = []
        self._head_len = 0
        self._tail: deque[str] = deque()
        self._tail_len = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
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
        with self._lock:
            gap = f"\n[... {self.dropped} characters left out ...]\n" if self.dropped else ""
            return "".join(self._head) + gap + "".join(self._tail)


_captures: dict[int, AttemptLog] = {}
_install_lock = threading.Lock()


class _ThreadTee:
    """A stream that also copies the writes of capturing threads into their logs."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        log = _captures.get(threading.get_ident())
        if log is not None:
            log.write(text)
        return self._stream.write(text)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _ThreadHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log = _captures.get(record.thread or 0)
        if log is not None:
            try:
                log.write(self.format(record) + "\n")
            except Exception:
                self.handleError(record)


_HANDLER = _ThreadHandler()
_HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


def _install() -> None:
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, _ThreadTee):
                setattr(sys, name, _ThreadTee(stream))
        root = logging.getLogger()
        if _HANDLER not in root.handlers:
            root.addHandler(_HANDLER)


@contextmanager
def capture(log: AttemptLog) -> Iterator[AttemptLog]:
    """Copy this thread's log records and stdout/stderr into ``log`` until the block ends."""
    _install()
    ident = threading.get_ident()
    _captures[ident] = log
    try:
        yield log
    finally:
        _captures.pop(ident, None)

"""The launcher's half of the ready handshake against stand-in daemons (small Python programs
that do one thing each: report, die, hang, lie in their log), so every way a start can go
wrong is seen quickly. The real daemon's half is in tests/daemon/test_ready_report.py."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from deepflow.procutil import signal_alive
from deepflow.replicas import spawn
from deepflow.replicas.spawn import DaemonFailed, spawn_daemon

pytestmark = pytest.mark.timeout(60)


PRELUDE = """
import json, os, signal, subprocess, sys, time

fd = int(sys.argv[sys.argv.index("--ready-fd") + 1])


def write_pid(pid=None):
    with open(sys.argv[1], "a") as f:
        f.write(f"{pid or os.getpid()}\\n")


def report(port):
    line = {"url": f"http://127.0.0.1:{port}", "host": "127.0.0.1", "port": port,
            "pid": os.getpid(), "model": "m"}
    os.write(fd, json.dumps(line).encode() + b"\\n")


write_pid()
"""


def fake(tmp_path: Path, body: str) -> list[str]:
    """A daemon command line: ``body`` runs after PRELUDE (``fd``, ``write_pid``, ``report``)."""
    script = tmp_path / "fake_daemon.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    return [sys.executable, str(script), str(tmp_path / "pid")]


def pids(tmp_path: Path) -> list[int]:
    return [int(line) for line in (tmp_path / "pid").read_text().split()]


def test_the_report_gives_address_and_pid(tmp_path: Path) -> None:
    argv = fake(tmp_path, "report(4321)\nos.close(fd)\ntime.sleep(60)\n")
    spawned = spawn_daemon(argv, tmp_path / "log", timeout_s=20)
    try:
        assert spawned.ready.url == "http://127.0.0.1:4321"
        assert (spawned.ready.port, spawned.ready.model) == (4321, "m")
        assert spawned.ready.pid == spawned.proc.pid == pids(tmp_path)[0]
        assert spawned.proc.poll() is None
    finally:
        spawned.proc.kill()
        spawned.proc.wait()


def test_a_daemon_that_dies_first_fails_at_once_with_its_status_and_log(tmp_path: Path) -> None:
    argv = fake(tmp_path, "print('loading went wrong', file=sys.stderr)\nsys.exit(3)\n")
    started = time.monotonic()
    with pytest.raises(DaemonFailed) as failed:
        spawn_daemon(argv, tmp_path / "log", timeout_s=60)
    assert time.monotonic() - started < 5  # end-of-file, not the 60 s deadline
    assert "exited with status 3 before it was ready" in str(failed.value)
    assert "loading went wrong" in str(failed.value)


def test_a_daemon_killed_by_a_signal_says_which(tmp_path: Path) -> None:
    argv = fake(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)\n")
    with pytest.raises(DaemonFailed, match="was killed by signal 9 before it was ready"):
        spawn_daemon(argv, tmp_path / "log", timeout_s=60)


def test_a_ready_line_in_the_log_is_not_a_report(tmp_path: Path) -> None:
    """Nothing reads the log for the address: a daemon that only prints times out, and is
    killed."""
    argv = fake(
        tmp_path,
        "print('FlowServe ready on http://127.0.0.1:1 model=m', flush=True)\ntime.sleep(60)\n",
    )
    with pytest.raises(DaemonFailed, match=r"not ready in 1s") as failed:
        spawn_daemon(argv, tmp_path / "log", timeout_s=1)
    assert "FlowServe ready on" in str(failed.value)  # the log's tail, for people
    assert not signal_alive(pids(tmp_path)[0])


def test_a_daemon_that_closes_the_pipe_and_lives_on_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spawn, "EXIT_GRACE_S", 0.5)
    argv = fake(tmp_path, "os.close(fd)\ntime.sleep(60)\n")
    with pytest.raises(DaemonFailed, match="closed its ready pipe without a report"):
        spawn_daemon(argv, tmp_path / "log", timeout_s=20)
    assert not signal_alive(pids(tmp_path)[0])


def test_a_malformed_report_fails_the_start(tmp_path: Path) -> None:
    argv = fake(tmp_path, 'os.write(fd, b\'{"url": "http://x:1"}\\n\')\ntime.sleep(60)\n')
    with pytest.raises(DaemonFailed, match="ready report is malformed"):
        spawn_daemon(argv, tmp_path / "log", timeout_s=20)
    assert not signal_alive(pids(tmp_path)[0])


def test_a_detached_daemon_that_fails_takes_its_children_along(tmp_path: Path) -> None:
    argv = fake(
        tmp_path,
        "child = subprocess.Popen(['sleep', '60'])\nwrite_pid(child.pid)\ntime.sleep(60)\n",
    )
    with pytest.raises(DaemonFailed, match="not ready in 2s"):
        spawn_daemon(argv, tmp_path / "log", timeout_s=2, detach=True)
    daemon, child = pids(tmp_path)
    assert not signal_alive(daemon)
    deadline = time.monotonic() + 5  # the child's parent (not us) reaps it
    while signal_alive(child):
        assert time.monotonic() < deadline, "the daemon's child outlived the failed start"
        time.sleep(0.05)


class Stopped(BaseException):
    """What the workers' lease guard raises into an operator's thread."""


def test_an_exception_raised_into_the_waiting_thread_kills_the_daemon(tmp_path: Path) -> None:
    argv = fake(tmp_path, "time.sleep(60)\n")
    outcome: list[BaseException] = []

    def launch() -> None:
        try:
            spawn_daemon(argv, tmp_path / "log", timeout_s=60)
        except BaseException as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=launch)
    waiting.start()
    while not (tmp_path / "pid").exists():
        time.sleep(0.02)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(waiting.ident or 0), ctypes.py_object(Stopped)
    )
    waiting.join(timeout=5)
    assert not waiting.is_alive() and isinstance(outcome[0], Stopped)
    assert not signal_alive(pids(tmp_path)[0])


def test_a_signal_that_stops_the_attempt_kills_the_daemon_at_once(tmp_path: Path) -> None:
    """How the workers stop an attempt: SIGTERM, whose handler raises in the main thread."""

    def stop(signum: int, frame: object) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        argv = fake(tmp_path, "time.sleep(60)\n")
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        started = time.monotonic()
        with pytest.raises(Stopped):
            spawn_daemon(argv, tmp_path / "log", timeout_s=60)
        assert time.monotonic() - started < 3
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not signal_alive(pids(tmp_path)[0])

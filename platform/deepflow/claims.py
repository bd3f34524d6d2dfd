"""What one ``deepflow up`` takes on this machine, its home and its ports, each checked as
its own: unheld before, held by this process (or its child) after.

Two ``up`` of one home would share its SQLite file, its broker folder and ``up.json``, so the
second stops before it touches any of them. Two ``up`` of two homes share only the ports: the
Prefect port moves to a free one unless DEEPFLOW_PREFECT_PORT named it (Prefect users often
run a server on 4200), and the API's port never moves: its URL is what people type and what
they gave their OpenAI clients, so a silently moved API would answer nobody.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from deepflow.procutil import signal_alive

DEFAULT_PREFECT_PORT = 4200
"""Prefect's own default, where a Prefect user's server often runs already."""
PREFECT_PORT_TRIES = 20
"""Ports from the default on tried in order (a port near 4200 is easy to find again), before
one the kernel picks."""
LOCK_FILE = "up.lock"
API_PORT_SETTING = "--port or DEEPFLOW_API_PORT"
PREFECT_PORT_SETTING = "DEEPFLOW_PREFECT_PORT"


class AlreadyRunning(RuntimeError):
    """Another ``up`` holds this home."""


class PortTaken(RuntimeError):
    """A port ``up`` needs is held by another process."""


def claim_home(home: Path) -> int:
    """Lock ``home`` for this process and write its pid in the lock; returns the lock's fd.

    An flock, not ``up.json``: that file appears only once the API answers, seconds after a
    second ``up`` could have upgraded the first's database. The kernel drops the lock when the
    process ends, however it ends; the fd is not inherited by the parts (``Popen`` closes it).
    """
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise AlreadyRunning(_running_message(home, holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    """The holder's pid; it writes it just after it locks, so wait a moment for it."""
    deadline = time.monotonic() + 1.0
    while (raw := os.pread(fd, 32, 0).strip()) == b"" and time.monotonic() < deadline:
        time.sleep(0.02)
    return int(raw) if raw.isdigit() else None


def _running_message(home: Path, pid: int | None) -> str:
    if pid is not None and signal_alive(pid):
        return (
            f"DeepFlow is already running for {home} (pid {pid}): stop it with `deepflow down`, "
            "or set DEEPFLOW_HOME to another folder to run a second one"
        )
    lock = home / LOCK_FILE
    return f"{lock} is held by a process left by an earlier up (pid {pid}, gone): `fuser {lock}`"


def claim_port(host: str, port: int, setting: str, what: str) -> socket.socket:
    """A socket bound and listening on ``host:port`` (0: one the kernel picks), or PortTaken
    naming the port and the ``setting`` that changes it."""
    try:
        return _bind(host, port)
    except OSError as exc:
        why = "is in use by another process" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise PortTaken(f"port {port} ({what}) {why}: choose another with {setting}") from None


def port_in_use(host: str, port: int) -> bool:
    try:
        _bind(host, port).close()
    except OSError:
        return True
    return False


def _bind(host: str, port: int) -> socket.socket:
    """SO_REUSEADDR as uvicorn and Prefect bind: a listener anywhere on the port (0.0.0.0,
    [::] included) makes it taken, a closed server's TIME_WAIT connections do not."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


def claim_prefect_port(host: str, port: int | None) -> socket.socket:
    """The Prefect server's port, held until it starts: ``port`` as set (else PortTaken), or
    with None the first free one from DEFAULT_PREFECT_PORT on, else one the kernel picks."""
    what = "for the Prefect server"
    if port is not None:
        return claim_port(host, port, PREFECT_PORT_SETTING, what)
    for candidate in range(DEFAULT_PREFECT_PORT, DEFAULT_PREFECT_PORT + PREFECT_PORT_TRIES):
        try:
            return claim_port(host, candidate, PREFECT_PORT_SETTING, what)
        except PortTaken:
            continue
    return claim_port(host, 0, PREFECT_PORT_SETTING, what)


def listens_in_session(session: int, port: int) -> bool | None:
    """Whether a process of ``session`` (a part is its own session's leader, so this is the
    part or any process it started) listens on TCP ``port``; None where /proc cannot tell."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    sockets = {f"socket:[{inode}]" for inode in inodes}
    for pid in _session_pids(session):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                    return True
            except OSError:
                continue
    return False


def _listening_inodes(port: int) -> set[str] | None:
    """The inodes of the sockets listening on ``port`` (IPv4 and IPv6) in this namespace."""
    inodes: set[str] = set()
    read = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        read = True
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... uid timeout inode
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    return inodes if read else None


def _session_pids(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rpartition(")")[2].split()  # state ppid pgrp session ...
        except OSError:
            continue
        if int(stat[3]) == session:
            pids.append(int(entry))
    return pids

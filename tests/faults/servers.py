"""Servers the fault suite owns, so it can kill and restart them: a PostgreSQL cluster of its
own (initdb in a temporary folder, a free port) and a Redis of its own (no persistence, so
a restart loses every queued message, the worst a broker restart can do)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from deepflow.launcher import free_port

POSTGRES_USER = "postgres"
"""initdb refuses to run as root; as root, the cluster runs as this system user."""


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _as_cluster_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", POSTGRES_USER, "--", *argv] if os.getuid() == 0 else argv


def tools_present() -> bool:
    return all(shutil.which(t) for t in ("initdb", "pg_ctl", "redis-server"))


class Postgres:
    """A throw-away cluster: fsync off (a crash of the machine is not a fault we inject);
    ``restart`` is an immediate shutdown (no checkpoint: the WAL replays, as after a crash)."""

    def __init__(self) -> None:
        # A folder of its own under the system's temporary folder: the cluster's owner must
        # reach it (pytest's folders are private to root).
        self.root = Path(tempfile.mkdtemp(prefix="deepflow-faults-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        if os.getuid() == 0:
            shutil.chown(self.root, POSTGRES_USER)
        subprocess.run(
            _as_cluster_owner(
                ["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync"]
            ),
            check=True,
            capture_output=True,
        )

    def _ctl(self, *args: str) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        argv = ["pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w"]
        subprocess.run(
            _as_cluster_owner([*argv, "-o", options, *args]), check=True, capture_output=True
        )

    def start(self) -> Postgres:
        self._ctl("start")
        _wait_port(self.port)
        return self

    def stop(self) -> None:
        self._ctl("-m", "immediate", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop it if it runs, and delete the cluster."""
        subprocess.run(
            _as_cluster_owner(["pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


class Redis:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> Redis:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.root)]
        with open(self.root / "log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

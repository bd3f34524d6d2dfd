"""Two ``deepflow up`` on one machine (issue 18): ports and homes are checked as their own.

Real processes, real sockets: a port is "taken" by a plain listening socket (what a Prefect
user's own server looks like to a bind) or by another running ``up``.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from deepflow.claims import DEFAULT_PREFECT_PORT, PortTaken, listens_in_session
from deepflow.config import Settings
from deepflow.launcher import Stack, free_port
from tests.test_cli import _deepflow, _env

JOB = {
    "tasks": [
        {"name": "a", "operator": "echo", "args": {"x": 1}},
        {"name": "b", "operator": "noop", "depends_on": ["a"]},
    ]
}


def _up(home: Path, api_port: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "deepflow.cli", "up", "--no-model", "--port", str(api_port)],
        env=_env(home, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float = 150) -> str:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while not any(marker in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        lines.append(proc.stdout.readline())
    return "".join(lines)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=90)


def _job_succeeds(home: Path) -> None:
    spec = home / "job.json"
    spec.write_text(json.dumps(JOB))
    done = _deepflow("submit", str(spec), "--wait", env=_env(home))
    assert done.returncode == 0 and "succeeded" in done.stderr, done.stdout + done.stderr


def _prefect_port(banner: str) -> int:
    return int(re.search(r"Prefect UI\s+http://127\.0\.0\.1:(\d+)", banner).group(1))  # type: ignore[union-attr]


@contextmanager
def _listening(port: int) -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", port)) as sock:
        yield sock


def _refused(
    args: list[str], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a command that must stop at once; returns it and how long it took."""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "deepflow.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - start


@pytest.mark.timeout(600)
def test_a_taken_prefect_port_moves_to_a_free_port_it_prints(tmp_path: Path) -> None:
    """Prefect's default port held by another server (a plain socket here, so the test is the
    same whether or not this machine runs a Prefect of its own), then two ``up`` of two homes
    with no DEEPFLOW_PREFECT_PORT: each moves to a port of its own, says so, and runs jobs."""
    try:
        held = socket.create_server(("127.0.0.1", DEFAULT_PREFECT_PORT))
    except OSError:
        held = None  # something on this machine holds it already: the same case for `up`
    first = second = None
    try:
        first = _up(tmp_path / "a", free_port())
        banner_a = _read_until(first, "Ctrl-C")
        second = _up(tmp_path / "b", free_port())
        banner_b = _read_until(second, "Ctrl-C")
        ports = {_prefect_port(banner_a), _prefect_port(banner_b)}
        assert len(ports) == 2 and DEFAULT_PREFECT_PORT not in ports, banner_a + banner_b
        for banner in (banner_a, banner_b):
            assert f"port {DEFAULT_PREFECT_PORT} is in use" in banner, banner
            assert f"using port {_prefect_port(banner)}" in banner, banner
            assert re.search(r"prefect server\s+healthy", banner), banner
        up_a = json.loads((tmp_path / "a" / "up.json").read_text())
        up_b = json.loads((tmp_path / "b" / "up.json").read_text())
        assert up_a["prefect_api_url"] != up_b["prefect_api_url"]
        _job_succeeds(tmp_path / "b")
        _job_succeeds(tmp_path / "a")
    finally:
        for proc in (second, first):
            if proc is not None:
                _stop(proc)
        if held is not None:
            held.close()
    assert first.returncode == 0 and second.returncode == 0


@pytest.mark.parametrize("taken", ["api", "prefect"])
def test_a_taken_port_that_was_asked_for_stops_up_at_once_naming_it(
    tmp_path: Path, taken: str
) -> None:
    """The API's port (users type its URL), or a Prefect port set in DEEPFLOW_PREFECT_PORT:
    one line naming the port and the setting, before anything starts or is written."""
    api_port, prefect_port = free_port(), free_port()
    port = api_port if taken == "api" else prefect_port
    env = _env(tmp_path / "home", DEEPFLOW_PREFECT_PORT=str(prefect_port))
    with _listening(port):
        result, took = _refused(["up", "--no-model", "--port", str(api_port)], env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"port {port} " in result.stderr, result.stderr
    setting = "--port or DEEPFLOW_API_PORT" if taken == "api" else "DEEPFLOW_PREFECT_PORT"
    assert setting in result.stderr, result.stderr
    assert result.stdout == "", "nothing may start"
    assert not (tmp_path / "home" / "deepflow.db").exists()
    assert not (tmp_path / "home" / "logs").exists()
    assert took < 30, took


@pytest.mark.timeout(400)
def test_a_second_up_of_one_home_refuses_and_leaves_the_first_alone(tmp_path: Path) -> None:
    """While the first is starting and once it is up: the second names the first's pid and
    leaves its processes and files alone (the old second removed up.json as it stopped); the
    first runs a job after."""
    first = _up(tmp_path, free_port(), DEEPFLOW_PREFECT_PORT=str(free_port()))
    try:
        _read_until(first, "starting a Prefect server")  # it holds the home from here on
        second = ["up", "--no-model", "--port", str(free_port())]
        env = _env(tmp_path, DEEPFLOW_PREFECT_PORT=str(free_port()))
        early, took = _refused(second, env)
        assert early.returncode == 1 and f"pid {first.pid}" in early.stderr, early.stderr
        assert "already running" in early.stderr and early.stderr.strip().count("\n") == 0
        assert took < 30, took
        _read_until(first, "Ctrl-C")
        up_file = (tmp_path / "up.json").read_text()
        late, _ = _refused(second, env)
        assert late.returncode == 1 and f"pid {first.pid}" in late.stderr, late.stderr
        assert (tmp_path / "up.json").read_text() == up_file
        status = _deepflow("status", env=_env(tmp_path))
        assert status.returncode == 0, status.stdout
        _job_succeeds(tmp_path)
    finally:
        _stop(first)
    assert first.returncode == 0


class _Healthy(BaseHTTPRequestHandler):
    """Another server on the port: it answers every GET with 200, as Prefect's /health does."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _SharedServer(HTTPServer):
    allow_reuse_port = True


def test_listens_in_session_tells_our_listener_from_another(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time; s = socket.create_server(('127.0.0.1', 0));"
            " print(s.getsockname()[1], flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        assert listens_in_session(child.pid, port) is True
        with _listening(free_port()) as ours:
            assert listens_in_session(child.pid, ours.getsockname()[1]) is False
    finally:
        child.kill()
        child.wait()


@pytest.mark.timeout(200)
def test_a_prefect_server_that_lost_its_port_is_not_taken_for_healthy(tmp_path: Path) -> None:
    """The race ``up`` cannot close: another server takes the port between our check and
    Prefect's bind (SO_REUSEPORT lets the test set it up), and answers /health. The old check
    called that healthy and sent our parts to the other server; now it is a one-line error
    naming the port, once our Prefect server has exited on its bind."""
    port = free_port()
    other = _SharedServer(("127.0.0.1", port), _Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(("127.0.0.1", port))
    stack = Stack(Settings(home=tmp_path, database_url="sqlite://", broker_url="memory://"))
    try:
        with pytest.raises(PortTaken, match=f"port {port} .*DEEPFLOW_PREFECT_PORT"):
            stack.start_prefect_server(held)
    finally:
        stack.stop()
        other.shutdown()
        other.server_close()

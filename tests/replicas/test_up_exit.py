"""Ctrl-C of ``deepflow up`` leaves no process behind: none of its own process group, none of
its parts' or what they started, none of an engine daemon's, also of an instance that got
stuck (SIGSTOP), failed its health checks and was replaced while ``up`` ran."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from deepflow.launcher import free_port
from tests.replicas.conftest import RECOVERY_S, group_members, port_free


@pytest.mark.timeout(600)
def test_ctrl_c_of_up_leaves_no_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPFLOW_")}
    env |= {
        "DEEPFLOW_HOME": str(tmp_path),
        "DEEPFLOW_PREFECT_PORT": str(free_port()),
        "DEEPFLOW_RECONCILE_INTERVAL_S": "0.5",  # a stuck daemon fails in seconds
    }
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "deepflow.cli", "up", "--model", "tiny", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, apart from pytest's
    )
    victim: dict[str, Any] = {}
    try:
        banner = _read_until(up, "Serving tiny-llama", timeout_s=400)
        key = re.search(r"API key\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        (d,) = httpx.get(f"{base}/v1/deployments", headers=auth).json()["data"]
        (victim,) = d["instances"]
        os.kill(victim["pid"], signal.SIGSTOP)
        deadline = time.monotonic() + RECOVERY_S
        while True:
            instances = httpx.get(f"{base}/v1/deployments/{d['id']}", headers=auth).json()[
                "instances"
            ]
            if any(i["state"] == "ready" and i["id"] != victim["id"] for i in instances):
                break
            assert time.monotonic() < deadline, f"no replacement came: {instances}"
            time.sleep(0.3)
        parts = json.loads((tmp_path / "up.json").read_text())["parts"].values()
        daemons = {i["pid"]: urlsplit(i["address"]).port for i in instances}
        groups = {up.pid, *parts, *daemons, *_descendants(up.pid).values()}
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=120)
    finally:
        if victim:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim["pid"], signal.SIGCONT)
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    assert up.returncode == 0, out
    time.sleep(1)  # what dies with its parent (PDEATHSIG) gets its signal as the parent exits
    left = {pgid: members for pgid in groups if (members := group_members(pgid))}
    assert not left, f"processes left by group: {left}\n{out}"
    assert all(port_free(p) for p in daemons.values() if p), daemons


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while not any(line.startswith(marker) for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        assert not (lines and lines[-1].startswith("!!")), "".join(lines)
        lines.append(proc.stdout.readline())
    return "".join(lines)


def _descendants(root: int) -> dict[int, int]:
    """Every process under ``root`` now, with its process group."""
    parent, group = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        parent[int(entry)], group[int(entry)] = int(fields[1]), int(fields[2])
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in found:
                found[child] = group[child]
                frontier.append(child)
    return found

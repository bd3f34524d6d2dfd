"""The daemon's half of the ready handshake: the report on --ready-fd, a start that fails
before it, and a launcher that is gone before it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from deepflow.replicas.spawn import DaemonFailed, spawn_daemon

from .conftest import Daemon, module_command

pytestmark = pytest.mark.timeout(120)


def test_the_report_names_the_real_port_pid_and_model(daemon: Daemon) -> None:
    ready = daemon.ready
    assert ready.port != 0 and ready.host == "127.0.0.1"  # --port 0: the system's pick
    assert ready.url == f"http://127.0.0.1:{ready.port}"
    assert ready.pid == daemon.proc.pid and ready.model == "tiny"
    assert httpx.get(f"{ready.url}/health", timeout=10).status_code == 200


def test_the_daemon_closes_the_ready_pipe_once_it_reported(daemon: Daemon) -> None:
    args = list(daemon.proc.args)  # type: ignore[arg-type]
    fd = Path(f"/proc/{daemon.proc.pid}/fd/{args[args.index('--ready-fd') + 1]}")
    assert not fd.exists() or not os.readlink(fd).startswith("pipe:")


def test_a_model_that_cannot_load_fails_the_start_with_status_and_reason(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    started = time.monotonic()
    with pytest.raises(DaemonFailed) as failed:
        spawn_daemon(module_command(broken, "--port", "0"), tmp_path / "log", timeout_s=90)
    assert time.monotonic() - started < 60
    message = str(failed.value)
    assert "exited with status 1 before it was ready" in message
    assert "flowserve: error:" in message  # the log's tail says why


def test_a_bad_ready_fd_is_refused_before_loading(tiny_model: Path) -> None:
    done = subprocess.run(
        module_command(tiny_model, "--ready-fd", "987"), capture_output=True, timeout=60
    )
    assert done.returncode == 1
    assert b"--ready-fd 987 is not an open file descriptor" in done.stderr


def test_a_daemon_whose_launcher_is_gone_exits_instead_of_serving_unseen(
    tiny_model: Path, tmp_path: Path
) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the launcher died before the daemon was ready
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            module_command(tiny_model, "--port", "0", "--ready-fd", str(write_fd)),
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    os.close(write_fd)
    try:
        assert proc.wait(timeout=90) == 1
    finally:
        proc.kill()
        proc.wait()
    assert "nobody knows this daemon's address" in log.read_text()

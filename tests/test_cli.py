"""The deepflow command line, run as real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deepflow.launcher import free_port
from deepflow.store import Database, authenticate
from tests.conftest import require_smollm2


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPFLOW_")}
    return {**env, "DEEPFLOW_HOME": str(home), **extra}


def _deepflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepflow.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_upgrade_then_keys_create(tmp_path: Path) -> None:
    env = _env(tmp_path)
    upgraded = _deepflow("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (tmp_path / "deepflow.db").exists()
    created = _deepflow("keys", "create", "--tenant", "acme", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert re.fullmatch(r"df-[\w-]{40,}", key)
    db = Database(f"sqlite:///{tmp_path / 'deepflow.db'}")
    with db.transaction() as s:
        grant = authenticate(s, key)
        assert grant is not None and grant.tenant.name == "acme"
    db.dispose()


def test_models_import_refuses_a_bad_file_in_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _deepflow("db", "upgrade", env=env).returncode == 0
    missing = _deepflow("models", "import", str(tmp_path / "nope.gguf"), env=env)
    assert missing.returncode == 1
    assert missing.stderr == f"deepflow: error: {tmp_path / 'nope.gguf'} is not a file\n"
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 4096)
    bad = _deepflow("models", "import", str(junk), "--name", "junk", env=env)
    assert bad.returncode == 1 and bad.stderr.startswith(f"deepflow: error: {junk} is not")
    assert bad.stderr.count("\n") == 1
    assert not (tmp_path / "models" / "junk").exists() or not any(
        (tmp_path / "models" / "junk").iterdir()
    )


def test_errors_are_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path)
    api = _deepflow("api", "--port", str(free_port()), env=env)
    assert api.returncode == 1
    assert api.stderr.strip().count("\n") == 0
    assert "deepflow db upgrade" in api.stderr
    bad = _env(tmp_path, DEEPFLOW_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    result = _deepflow("keys", "create", "--tenant", "x", env=bad)
    assert result.returncode == 1
    assert result.stderr.startswith("deepflow: error: cannot reach the database")
    assert result.stderr.strip().count("\n") == 0


@pytest.mark.timeout(600)
def test_up_runs_a_job_serves_a_model_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """The Quick start's first command: everything on the embedded defaults (SQLite, the
    filesystem broker, a Prefect server of its own), then a dag job to succeeded, and the
    quick-start model (SmolLM2, imported from its GGUF file on this first start) answers the
    ``curl`` and ``openai`` lines it prints, in English."""
    require_smollm2()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepflow.cli", "up", "--port", str(port)],
        env=_env(tmp_path, DEEPFLOW_PREFECT_PORT=str(free_port())),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 150
        assert proc.stdout is not None
        while not any("Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())
        banner = "".join(lines)
        key = re.search(r"API key\s+(\S+)", banner).group(1)  # type: ignore[union-attr]
        flat = re.sub(r"\s+", " ", banner)
        for part in ("lease reconciler", "prefect server", "prefect worker", "cpu worker 0"):
            assert f"{part} healthy" in flat, banner
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health").json() == {"status": "ok"}
        auth = {"Authorization": f"Bearer {key}"}
        body = {
            "kind": "dag",
            "spec": {
                "tasks": [
                    {"name": "a", "operator": "echo", "args": {"x": 1}},
                    {"name": "b", "operator": "noop", "depends_on": ["a"]},
                ]
            },
        }
        # the POST waits up to REQUEST_DISPATCH_S (10 s) for Prefect to create the flow run:
        # more than httpx's default 5 s while the quick-start model is being prepared
        r = httpx.post(f"{base}/v1/jobs", json=body, headers=auth, timeout=30)
        assert r.status_code == 201
        job_id = r.json()["id"]
        assert r.json()["flow_run_id"], "the API should have started the job's flow run"
        deadline = time.monotonic() + 120
        while (job := httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth).json())["state"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "succeeded", job
        assert job["tasks"][0]["output"] == {"x": 1}
        assert (tmp_path / "api_key").read_text().strip() == key
        deadline = time.monotonic() + 240
        while not lines[-1].startswith("Serving smollm2-135m-instruct"):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            assert not lines[-1].startswith("!!"), "".join(lines)
            lines.append(proc.stdout.readline())
        curl, client = proc.stdout.readline().strip(), proc.stdout.readline().strip()
        answer = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        message = json.loads(answer.stdout)["choices"][0]["message"]
        assert message["role"] == "assistant" and "Paris" in message["content"], answer
        assert client.startswith(f"{sys.executable} -c"), "the line must run as printed"
        said = subprocess.run(client, shell=True, capture_output=True, text=True, timeout=60)
        assert said.returncode == 0 and "Paris" in said.stdout, said
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "DeepFlow stopped (1 engine instance(s) stopped)." in out


@pytest.mark.parametrize("argv", [["keys"], ["nope"], ["make-test-model"]])
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str]) -> None:
    result = _deepflow(*argv, env=_env(tmp_path))
    assert result.returncode == 2 and "usage: deepflow" in result.stderr


def _start_up(home: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    """``deepflow up --no-model``; returns it and its banner."""
    env = _env(home, DEEPFLOW_PREFECT_PORT=str(free_port()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepflow.cli", "up", "--no-model", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 150
    assert proc.stdout is not None
    while not any("Ctrl-C" in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        lines.append(proc.stdout.readline())
    return proc, "".join(lines)


@pytest.mark.timeout(400)
def test_job_commands_against_a_running_up(tmp_path: Path) -> None:
    """submit (--wait, success and failure), jobs, job, logs, cancel, deployments, status and
    down, each a process of its own, finding the API through the home ``up`` runs in."""
    proc, _ = _start_up(tmp_path, free_port())
    env = _env(tmp_path)  # no URL, no key: both come from the running up
    try:
        status = _deepflow("status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        for part in ("api", "prefect api", "prefect worker", "cpu worker 0"):
            assert re.search(rf"{part}\s+healthy", status.stdout), status.stdout

        good = tmp_path / "good.json"
        good.write_text(
            json.dumps(
                {
                    "tasks": [
                        {"name": "a", "operator": "echo", "args": {"x": 1}},
                        {"name": "b", "operator": "noop", "depends_on": ["a"]},
                    ]
                }
            )
        )
        ok = _deepflow("submit", str(good), "--wait", env=env)
        assert ok.returncode == 0, ok.stderr
        ok_id = ok.stdout.strip()
        assert re.fullmatch(r"job_\w+", ok_id), ok.stdout
        assert "2/2 done" in ok.stderr and f"job {ok_id} succeeded" in ok.stderr, ok.stderr

        failing = json.dumps(
            {"tasks": [{"name": "boom", "operator": "fail", "args": {"message": "no luck"}}]}
        )
        bad = subprocess.run(
            [sys.executable, "-m", "deepflow.cli", "submit", "-", "--wait"],
            input=failing,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert bad.returncode == 1, bad.stderr
        bad_id = bad.stdout.strip()
        assert f"job {bad_id} failed" in bad.stderr and "task boom failed" in bad.stderr
        assert "no luck" in bad.stderr

        listed = _deepflow("jobs", env=env)
        assert listed.returncode == 0 and ok_id in listed.stdout and bad_id in listed.stdout
        only_failed = _deepflow("jobs", "--state", "failed", env=env)
        assert bad_id in only_failed.stdout and ok_id not in only_failed.stdout

        shown = _deepflow("job", ok_id, env=env)
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"^b\s+noop\s+succeeded\s+1/\d+\s+a$", shown.stdout, re.M), shown.stdout

        logged = _deepflow("logs", bad_id, "boom", env=env)
        assert logged.returncode == 0, logged.stderr
        assert "== boom · attempt 1 · failed" in logged.stdout, logged.stdout
        missing = _deepflow("logs", bad_id, "nope", env=env)
        assert missing.returncode == 1 and "has no task 'nope'" in missing.stderr

        long = json.dumps(
            {"tasks": [{"name": "long", "operator": "sleep", "args": {"seconds": 120}}]}
        )
        started = subprocess.run(
            [sys.executable, "-m", "deepflow.cli", "submit", "-"],
            input=long,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert started.returncode == 0, started.stderr
        long_id = started.stdout.strip()
        cancelled = _deepflow("cancel", long_id, env=env)
        assert cancelled.returncode == 0 and f"job {long_id} cancelled" in cancelled.stdout
        again = _deepflow("cancel", long_id, env=env)
        assert again.returncode == 1 and again.stderr.startswith("deepflow: error: 409")
        assert again.stderr.strip().count("\n") == 0

        deployments = _deepflow("deployments", env=env)
        assert deployments.returncode == 0 and deployments.stdout.startswith("ID")

        down = _deepflow("down", env=env)
        assert down.returncode == 0 and "DeepFlow stopped." in down.stdout, down.stderr
        assert proc.wait(timeout=10) == 0
        after = _deepflow("status", env=env)
        assert after.returncode == 1 and "not running" in after.stdout
        # Secrets are never logged: the key every command above sent is in no part's log.
        key = (tmp_path / "api_key").read_text().strip()
        logs = sorted((tmp_path / "logs").glob("*.log"))
        assert len(logs) >= 3, logs
        assert [p.name for p in logs if key in p.read_text(errors="replace")] == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)


def test_job_commands_without_a_platform_say_so_in_one_line(tmp_path: Path) -> None:
    result = _deepflow("jobs", env=_env(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("deepflow: error: no DeepFlow API to talk to")
    gone = _deepflow("jobs", env=_env(tmp_path, DEEPFLOW_API_URL=f"http://127.0.0.1:{free_port()}"))
    assert gone.returncode == 1 and "cannot reach the DeepFlow API" in gone.stderr
    assert gone.stderr.strip().count("\n") == 0


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deepflow.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and re.fullmatch(r"deepflow \d+\.\d+\.\d+\n", result.stdout)

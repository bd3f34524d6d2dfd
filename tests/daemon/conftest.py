"""The FlowServe daemon as a real process on the tiny test model, and helpers to read it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deepflow.engine.daemon.main import ReadyReport
from deepflow.replicas.spawn import DaemonFailed, spawn_daemon


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    ready: ReadyReport
    log: Path

    @property
    def url(self) -> str:
        return self.ready.url

    @property
    def model(self) -> str:
        return self.ready.model

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """{(sample name, sorted labels): value} of GET /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_idle(self, timeout: float = 10.0) -> dict[str, Any]:
        """/health once nothing runs or waits and no KV block is in use."""
        return wait_for(
            lambda: (
                (h := self.health().json())["running"] == 0
                and h["waiting"] == 0
                and h["kv_cache_usage"] == 0.0
                and h
            ),
            timeout,
            f"the daemon never went idle: {self.health().text}",
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for(predicate: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def start_daemon(command: list[str], log: Path, timeout: float = 90.0) -> Daemon:
    """Run ``command`` (ending in daemon arguments) with --port 0; wait for its ready report
    (the launcher's own handshake, ``deepflow.replicas.spawn``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: one torch thread each
    try:
        spawned = spawn_daemon([*command, "--port", "0"], log, timeout_s=timeout, env=env)
    except DaemonFailed as exc:
        pytest.fail(f"the daemon did not start: {exc}")
    return Daemon(spawned.proc, spawned.ready, log)


def serve_command(model_dir: Path, *args: str) -> list[str]:
    """`deepflow serve` as the console script runs it."""
    return [sys.executable, "-m", "deepflow.cli", "serve", str(model_dir), *args]


def module_command(model_dir: Path, *args: str) -> list[str]:
    """`python -m deepflow.engine.daemon`."""
    return [sys.executable, "-m", "deepflow.engine.daemon", str(model_dir), *args]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama test model (real tokenizer and chat template, random weights)."""
    from deepflow.engine.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("daemon_model") / "tiny-llama", "llama", "tiny")


@pytest.fixture
def engine(tiny_model: Path) -> Iterator[Any]:
    """An AsyncLLMEngine in this process, for the in-process (ASGI) app tests."""
    from deepflow.engine import AsyncLLMEngine, EngineConfig, LLMEngine

    config = EngineConfig(model=str(tiny_model), num_kv_blocks=64, max_num_seqs=2)
    engine = AsyncLLMEngine(LLMEngine(config))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One `deepflow serve` shared by the tests that leave it idle when they end."""
    log = tmp_path_factory.mktemp("daemon_log") / "deploy.log"
    command = serve_command(
        tiny_model, "--served-model-name", "tiny", "--num-kv-blocks", "256", "--max-num-seqs", "8"
    )
    daemon = start_daemon(command, log)
    yield daemon
    assert daemon.stop() == 0, log.read_text(errors="replace")

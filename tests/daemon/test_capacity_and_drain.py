"""Over capacity (429), draining on SIGTERM and POST /drain (503, then exit 0), start-up
errors."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from deepflow.engine import AsyncLLMEngine
from deepflow.engine.daemon import build_app

from .conftest import module_command, serve_command, start_daemon, wait_for

pytestmark = pytest.mark.timeout(120)


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_over_capacity_is_429(tiny_model: Path, tmp_path: Path) -> None:
    """One sequence runs, one may wait: a third request is refused until the queue moves."""
    daemon = start_daemon(
        module_command(tiny_model, "--max-num-seqs", "1", "--max-waiting", "1"),
        tmp_path / "daemon.log",
    )
    try:
        assert daemon.model == "tiny-llama"  # the folder's name by default
        client = client_for(daemon.url)
        running = client.completions.create(
            model="tiny-llama",
            prompt="a",
            stream=True,
            max_tokens=2000,
            extra_body={"ignore_eos": True},
        )
        next(iter(running))
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(
                client.completions.create, model="tiny-llama", prompt="b", max_tokens=3
            )
            wait_for(lambda: daemon.health().json()["waiting"] == 1, 10, "b never queued")
            with pytest.raises(openai.RateLimitError) as refused:
                client.completions.create(model="tiny-llama", prompt="c", max_tokens=3)
            assert refused.value.status_code == 429 and refused.value.code == "over_capacity"
            running.close()  # frees the running slot: b runs
            assert queued.result(timeout=10).usage.completion_tokens <= 3  # type: ignore[union-attr]
        late = client.completions.create(model="tiny-llama", prompt="c", max_tokens=3)
        assert late.choices[0].finish_reason in ("stop", "length")
        daemon.wait_idle()
    finally:
        assert daemon.stop() == 0, daemon.log.read_text(errors="replace")


def test_sigterm_drains_open_requests_then_exits_0(tiny_model: Path, tmp_path: Path) -> None:
    daemon = start_daemon(serve_command(tiny_model), tmp_path / "daemon.log")
    try:
        client = client_for(daemon.url)
        stream = client.completions.create(
            model=daemon.model,
            prompt="Once upon a time",
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=300,
            extra_body={"ignore_eos": True},
        )
        chunks = [next(iter(stream))]
        # The stream is not read on: the request stays open until this test reads it.
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: daemon.health().status_code == 503, 10, "never began draining")
        assert daemon.health().json()["error"]["code"] == "draining"
        with pytest.raises(openai.InternalServerError) as refused:
            client.completions.create(model=daemon.model, prompt="late", max_tokens=2)
        assert refused.value.status_code == 503 and refused.value.code == "draining"
        assert daemon.proc.poll() is None, "exited with a request open"
        chunks += list(stream)
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 300
        assert daemon.proc.wait(timeout=20) == 0
    finally:
        daemon.stop()


async def test_post_drain_refuses_new_work_and_aborts_what_outlives_the_grace(
    engine: AsyncLLMEngine,
) -> None:
    app = build_app(engine, "tiny", max_waiting=4)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://daemon") as http:
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 1000, "ignore_eos": True}
        long = asyncio.create_task(http.post("/v1/completions", json=body, timeout=60))
        server = app.state.flowserve
        while not server.active:
            assert not long.done(), long.result().text
            await asyncio.sleep(0.01)
        drained = await http.post("/drain")
        assert drained.status_code == 200 and drained.json()["status"] == "draining"
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
        refused = await http.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert refused.status_code == 503
        assert refused.json()["error"] == {
            "message": "the server is draining and takes no new requests",
            "type": "service_unavailable_error",
            "param": None,
            "code": "draining",
        }
        await server.drain(grace_s=0.2)  # what `deepflow serve` runs after /drain
        answer = await long
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["finish_reason"] == "abort"
        assert not server.active and server.num_queued == 0
    for _ in range(100):
        if engine.get_stats().num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.get_stats().kv_cache_usage == 0


def test_serve_refuses_a_folder_without_a_model(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deepflow.cli", "serve", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("deepflow: error:") and "no config.json" in result.stderr
    assert result.stderr.strip().count("\n") == 0

"""Oversized prompts, on a real daemon: refused before they are tokenised, and /health keeps
answering meanwhile (a 10 MB prompt once stalled it for 19.5 s, long enough for the
supervisor to replace a healthy instance)."""

from __future__ import annotations

import threading
import time

import httpx

from tests.daemon.conftest import Daemon

HUGE = "lorem ipsum dolor sit amet " * 400_000  # ~10.8 MB


def test_a_10_mb_prompt_is_refused_at_once_and_health_keeps_answering(daemon: Daemon) -> None:
    answers: list[httpx.Response] = []
    asks = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE}]}, "messages"),
        ("/v1/completions", {"prompt": HUGE}, "prompt"),
    ]

    def ask() -> None:
        for path, body, _ in asks:
            answers.append(
                httpx.post(f"{daemon.url}{path}", json={"model": daemon.model, **body}, timeout=60)
            )

    asking = threading.Thread(target=ask)
    start = time.monotonic()
    asking.start()
    slowest = 0.0
    while asking.is_alive():
        t = time.monotonic()
        assert daemon.health().status_code == 200
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.05)
    took = time.monotonic() - start
    assert slowest < 1.0, f"/health took {slowest:.1f} s while the prompts were handled"
    assert took < 10, f"two oversized prompts took {took:.1f} s to refuse"
    for r, (_, _, param) in zip(answers, asks, strict=True):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
        assert "context" in error["message"]

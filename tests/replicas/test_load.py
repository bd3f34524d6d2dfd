"""The gateway under load, on real processes: 200 concurrent streaming chats over two CPU
instances of the tiny model while 20 clients walk away mid-stream; then an instance is killed
in the middle of a burst.

What the instances count is exact: a chat generates its ``max_tokens``, a walk-away that was
not aborted its ``max_tokens`` too, an aborted one what it got before its abort."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import Platform
from tests.replicas.conftest import MODEL, RECOVERY_S, deployment, wait_deployment

pytestmark = pytest.mark.timeout(400)

ALWAYS = {"ignore_eos": True}
METRIC = re.compile(r"^(flowserve:[a-z_]+)\{([^}]*)\} ([0-9.e+-]+)$", re.M)


@pytest.fixture(scope="module")
def deployed(serving: Platform) -> dict[str, Any]:
    r = serving.call(
        "POST",
        "/v1/deployments",
        {
            "model": MODEL,
            "replicas": 2,
            "policy": "least_outstanding_tokens",
            "engine_args": {"max_num_seqs": 128},
        },
    )
    assert r.status_code == 201, r.text
    return wait_deployment(serving, r.json()["id"], "ready", ready=2)


def scrape(address: str) -> Counter[tuple[str, str]]:
    """Counters and histogram counts of one instance, by (name, labels without model)."""
    out: Counter[tuple[str, str]] = Counter()
    for name, labels, value in METRIC.findall(httpx.get(f"{address}/metrics").text):
        kept = ",".join(p for p in labels.split(",") if not p.startswith("model_name"))
        out[(name, kept)] += float(value)
    return out


def totals(d: dict[str, Any]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for i in d["instances"]:
        if i["state"] == "ready":
            out += scrape(i["address"])
    return out


async def chat(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> tuple[int, int]:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"request {i}: tell me something"}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=ALWAYS,
    )
    pieces, usage = 0, None
    async for chunk in stream:
        pieces += sum(bool(c.delta.content) for c in chunk.choices)
        usage = chunk.usage or usage
    assert usage is not None
    return usage.completion_tokens, pieces


CHATS, CHAT_TOKENS = 200, 8
WALKAWAYS, WALKAWAY_TOKENS = 20, 1500
SEEN = 2
"""Tokens a walk-away surely received before hanging up: it reads three data lines, and the
first carries only the role (a later delta may carry several tokens)."""
ABORT_STEPS = 30
"""How many more tokens a walked-away request may get: one per engine step while its hang-up
crosses the gateway and the daemon (two event-loop hops, then the next step boundary), plus
the steps by which its stream lagged its engine. A relay that keeps up is a step or two
behind; 30 leaves room for a busy machine."""


async def walk_away(url: str, key: str, i: int) -> None:
    """Read three chunks of a long stream, then hang up (the connection is closed)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"long story {i}"}],
        "max_tokens": WALKAWAY_TOKENS,
        "stream": True,
        **ALWAYS,
    }
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(timeout=300) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break


@dataclass(repr=False)  # a failed assertion shows the numbers, not every result
class LoadRun:
    results: list[tuple[int, int]]
    """(completion tokens, content chunks) of each chat."""
    delta: Counter[tuple[str, str]]
    """What the instances counted during the run."""
    per_instance: list[Counter[tuple[str, str]]]

    def success(self, reason: str) -> float:
        return self.delta[("flowserve:request_success_total", f'finished_reason="{reason}"')]

    @property
    def walkaway_tokens(self) -> float:
        """Tokens generated for the walk-aways: all but the chats' (each exactly its max)."""
        generated = self.delta[("flowserve:generation_tokens_total", "")]
        return generated - CHATS * CHAT_TOKENS

    @property
    def aborted_tokens(self) -> float:
        """Tokens of the aborted walk-aways: a walk-away not aborted ran to its max."""
        return self.walkaway_tokens - WALKAWAY_TOKENS * (WALKAWAYS - self.success("abort"))


@pytest.fixture(scope="module")
def load_run(serving: Platform, deployed: dict[str, Any]) -> LoadRun:
    """200 streaming chats while 20 clients walk away mid-stream, once; until every instance
    is idle with its blocks freed."""
    before = totals(deployed)

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(
            base_url=f"{serving.url}/v1", api_key=serving.key, max_retries=0, timeout=300
        )
        jobs = [chat(client, i, CHAT_TOKENS) for i in range(CHATS)]
        jobs += [walk_away(serving.url, serving.key, i) for i in range(WALKAWAYS)]
        try:
            return await asyncio.gather(*jobs)
        finally:
            await client.close()

    results = asyncio.run(run())[:CHATS]
    deadline = time.monotonic() + 60
    while True:  # the walked-away requests are aborted (or ran out) and their blocks freed
        loads = [httpx.get(f"{i['address']}/health").json() for i in deployed["instances"]]
        idle = all(h["running"] == 0 and h["waiting"] == 0 for h in loads)
        if idle and all(h["kv_cache_usage"] == 0 for h in loads):
            break
        assert time.monotonic() < deadline, loads
        time.sleep(0.2)
    per_instance = [scrape(i["address"]) for i in deployed["instances"]]
    return LoadRun(results, totals(deployed) - before, per_instance)


def test_200_streams_and_20_disconnects(load_run: LoadRun) -> None:
    """Every chat gets all its tokens, every request is counted once under its ending, and
    the tokens add up exactly: chats and walk-aways that ran out at their max, plus what
    the aborted walk-aways got before their abort (at least what they read, less than
    their max)."""
    results = load_run.results
    assert all(tokens == CHAT_TOKENS for tokens, _ in results), Counter(t for t, _ in results)
    assert all(pieces >= 1 for _, pieces in results)
    # How many walk-aways were aborted in time is the xfail below (a known defect): here only
    # that each request is counted once and the tokens add up, however many there were.
    aborted = load_run.success("abort")
    assert load_run.success("length") == CHATS + (WALKAWAYS - aborted)
    assert load_run.success("stop") == 0
    assert load_run.delta[("flowserve:time_to_first_token_seconds_count", "")] == 220
    assert SEEN * aborted <= load_run.aborted_tokens <= (WALKAWAY_TOKENS - 1) * aborted
    finished = 'finished_reason="length"'
    assert all(m[("flowserve:request_success_total", finished)] > 0 for m in load_run.per_instance)


@pytest.mark.xfail(
    strict=False,
    reason="under load the gateway learns of its client's hang-up seconds late: with the "
    "clients in a process of their own, they closed 0-2.7 s into the run and the gateway's "
    "listen_for_disconnect returned 6.4-8.6 s in, each instance abort following within "
    "milliseconds (2026-12-07, night; ~1,100 tokens a walk-away, ~570 since the gateway keeps "
    "16 idle connections, not 512); unloaded, 3-4 tokens",
)
def test_walked_away_streams_are_aborted_within_a_few_steps(load_run: LoadRun) -> None:
    """Each walk-away is aborted, having got what it read plus at most ABORT_STEPS tokens."""
    aborted = load_run.success("abort")
    per_walkaway = load_run.walkaway_tokens / WALKAWAYS
    assert aborted == WALKAWAYS, f"{WALKAWAYS - aborted:g} ran to their end"
    assert load_run.aborted_tokens <= (SEEN + ABORT_STEPS) * WALKAWAYS, (
        f"{per_walkaway:.0f} tokens per walk-away"
    )


def test_killing_an_instance_mid_load(serving: Platform, deployed: dict[str, Any]) -> None:
    """Only what the victim was streaming fails, and its replacement is ready within
    RECOVERY_S of the kill: a bound on recovery time (a replacement that never comes fails
    the test then, not minutes later)."""
    victim = deployment(serving, deployed["id"])["instances"][0]
    killed_at: list[float] = []

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(
            base_url=f"{serving.url}/v1", api_key=serving.key, max_retries=0, timeout=300
        )

        async def kill_soon() -> None:
            await asyncio.sleep(1.0)
            os.kill(victim["pid"], signal.SIGKILL)
            killed_at.append(time.monotonic())

        async def one(i: int) -> Any:
            await asyncio.sleep(i * 0.02)  # arrivals spread over the kill
            try:
                return await chat(client, i, 48)
            except openai.APIError as exc:  # cut off mid-stream: an error, not a silent end
                return exc

        try:
            results = await asyncio.gather(*[one(i) for i in range(120)], kill_soon())
            return results[:120]
        finally:
            await client.close()

    results = asyncio.run(run())
    failed = [r for r in results if isinstance(r, Exception)]
    done = [r for r in results if not isinstance(r, Exception)]
    assert all(tokens == 48 for tokens, _ in done)
    why = Counter(f"{type(e).__name__}: {str(e)[:100]}" for e in failed)
    # Only what the victim was streaming when it died may fail; whatever arrived later, or
    # had not had a byte back, goes to the survivor.
    assert len(done) >= 60, f"{len(failed)} failed: {why}"
    assert all("mid-stream" in str(e) for e in failed), why
    left = max(0.0, killed_at[0] + RECOVERY_S - time.monotonic())
    d = wait_deployment(serving, deployed["id"], "ready", ready=2, timeout_s=left)
    assert victim["id"] not in {i["id"] for i in d["instances"] if i["state"] == "ready"}

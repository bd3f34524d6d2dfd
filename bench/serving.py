"""Serving through the gateway: Poisson arrivals at rising rates, and what the gateway adds.

Brings up the platform with ``deepflow up`` (embedded defaults, its quick-start tiny model),
scales the deployment to ``--replicas``, then

1. gateway overhead: ``--probe`` sequential one-token completions sent alternately to an
   instance directly and through the gateway; medians and the difference;
2. for each rate in ``--rates`` (requests/s; ``inf`` sends all at once), ``--requests``
   streaming chat completions with Poisson arrivals (seeded), ``--output-len`` tokens each
   (EOS ignored): TTFT, TPOT, ITL and E2E mean/p50/p99, request and token throughput, as
   vLLM's serving benchmark reports them.

    .venv/bin/python bench/serving.py [--rates 1,2,4,8,inf] [--requests 64] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from deepflow.launcher import free_port  # noqa: E402

MODEL = "tiny-llama"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"]


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def launch(home: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "DEEPFLOW_HOME": str(home), "DEEPFLOW_PREFECT_PORT": str(free_port())}
    env["DEEPFLOW_RECONCILE_INTERVAL_S"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "deepflow.cli", "up", "--model", "tiny", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_serving(proc: subprocess.Popen[str]) -> str:
    """Read `up`'s output until the model is served; returns the API key."""
    assert proc.stdout is not None
    key = ""
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        if m := re.search(r"API key\s+(\S+)", line):
            key = m.group(1)
        if line.startswith("Serving ") or line.startswith("!!"):
            print(f"  {line.strip()}", flush=True)
            if line.startswith("!!"):
                raise RuntimeError(line)
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the platform did not come up")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    return key


def scale(url: str, key: str, replicas: int) -> list[str]:
    auth = {"Authorization": f"Bearer {key}"}
    (dep,) = httpx.get(f"{url}/v1/deployments", headers=auth).json()["data"]
    httpx.patch(f"{url}/v1/deployments/{dep['id']}", json={"replicas": replicas}, headers=auth)
    while True:
        dep = httpx.get(f"{url}/v1/deployments/{dep['id']}", headers=auth).json()
        ready = [i["address"] for i in dep["instances"] if i["state"] == "ready"]
        if dep["state"] == "ready" and len(ready) == replicas:
            return ready
        time.sleep(0.5)


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def probe_overhead(
    url: str, key: str, direct: str, n: int
) -> tuple[list[float], list[float]]:
    """Latency of a one-token completion, direct vs through the gateway, interleaved."""
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 1, "ignore_eos": True}
    auth = {"Authorization": f"Bearer {key}"}
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(n + 10):
            for name, base in (("direct", direct), ("gateway", url)):
                t0 = time.perf_counter()
                r = await client.post(f"{base}/v1/completions", json=body, headers=auth)
                elapsed = time.perf_counter() - t0
                r.raise_for_status()
                if i >= 10:  # warm connections first
                    times[name].append(elapsed)
    return times["direct"], times["gateway"]


async def one_request(
    client: httpx.AsyncClient, url: str, key: str, text: str, output_len: int
) -> Result:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    auth = {"Authorization": f"Bearer {key}"}
    t0 = time.perf_counter()
    res = Result(ok=False)
    last = None
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=auth
        ) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.e2e = time.perf_counter() - t0
    res.ok = res.output_tokens == output_len
    if not res.ok:
        res.error = f"{res.output_tokens} tokens"
    return res


async def run_rate(
    url: str, key: str, rate: float, n: int, output_len: int, seed: int
) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=2048)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks = []
        t0 = time.perf_counter()
        for _ in range(n):
            tasks.append(
                asyncio.create_task(
                    one_request(client, url, key, prompt(rng, rng.randint(20, 60)), output_len)
                )
            )
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summarize(rate: float, results: list[Result], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ms = 1000.0
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    row: dict[str, Any] = {
        "rate": "inf" if rate == float("inf") else f"{rate:g}",
        "ok": f"{len(ok)}/{len(results)}",
        "req/s": len(ok) / duration,
        "out tok/s": sum(r.output_tokens for r in ok) / duration,
        "in tok": sum(r.prompt_tokens for r in ok),
    }
    for name, xs in (
        ("TTFT", [r.ttft for r in ok]),
        ("TPOT", tpot),
        ("ITL", itl),
        ("E2E", [r.e2e for r in ok]),
    ):
        row[f"{name} mean"] = statistics.fmean(xs) * ms if xs else float("nan")
        row[f"{name} p50"] = pct(xs, 50) * ms
        row[f"{name} p99"] = pct(xs, 99) * ms
    errors = [r.error for r in results if not r.ok]
    if errors:
        print(f"  rate {row['rate']}: {len(errors)} failed, e.g. {errors[0]}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="1,2,4,8,inf")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--probe", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        print("starting the platform (deepflow up) ...", flush=True)
        proc = launch(Path(tmp), port)
        try:
            key = wait_serving(proc)
            addresses = scale(url, key, args.replicas)
            print(f"  {len(addresses)} ready instance(s): {', '.join(addresses)}", flush=True)
            direct, gateway = asyncio.run(probe_overhead(url, key, addresses[0], args.probe))
            rows = []
            for rate in rates:
                print(f"rate {rate:g} req/s, {args.requests} requests ...", flush=True)
                results, duration = asyncio.run(
                    run_rate(url, key, rate, args.requests, args.output_len, args.seed)
                )
                rows.append(summarize(rate, results, duration))
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(120)
    ms = 1000.0
    print(f"\nGateway overhead, {args.probe} sequential one-token completions each way")
    print(f"{'path':<10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, xs in (("direct", direct), ("gateway", gateway)):
        print(f"{name:<10} {pct(xs, 50) * ms:>8.2f} {pct(xs, 99) * ms:>8.2f}")
    added = (pct(gateway, 50) - pct(direct, 50)) * ms
    print(f"the gateway adds {added:.2f} ms at the median")
    print(
        f"\nPoisson arrivals through the gateway: {args.requests} streaming chats per rate, "
        f"{args.output_len} output tokens, {args.replicas} CPU instance(s) of {MODEL}"
    )
    cols = ["rate", "ok", "req/s", "out tok/s"]
    for name in ("TTFT", "TPOT", "ITL", "E2E"):
        cols += [f"{name} p50", f"{name} p99"]
    print("  ".join(f"{c:>10}" for c in cols) + "   (latencies in ms)")
    for row in rows:
        print(
            "  ".join(
                f"{row[c]:>10.1f}" if isinstance(row[c], float) else f"{row[c]:>10}" for c in cols
            )
        )


if __name__ == "__main__":
    main()

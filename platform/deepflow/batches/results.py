"""A shard's results as it runs, and the batch's output and error files made from them.

Each shard appends one JSON line per finished request to its own file under
``DEEPFLOW_HOME/batches/<batch id>/``; a retried attempt (a killed worker, a lost lease)
reopens it and runs only the requests not in it, so a shard's work survives redelivery and
its counts never go back. The merge orders every result by its record number, so the output
and error files list their lines in the input's order of ``custom_id``.

The lines are OpenAI's: ``{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}``, where ``body`` is what the engine daemon answers the same request (its
error body for a refused one, which goes to the error file).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepflow.store.batches import Counts


@dataclass(slots=True)
class Result:
    index: int
    """The record's number in the input file (from 0)."""
    ok: bool
    line: dict[str, Any]
    """The output (or error) file's line."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


def output_line(custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": {
            "status_code": status_code,
            "request_id": f"req_{uuid.uuid4().hex[:24]}",
            "body": body,
        },
        "error": None,
    }


def shard_path(home: Path, batch_id: str, shard: int) -> Path:
    return folder(home, batch_id) / f"shard_{shard}.jsonl"


def folder(home: Path, batch_id: str) -> Path:
    return home / "batches" / batch_id


class ShardResults:
    """One shard's results file, open for appending; ``done`` and ``counts`` include what
    earlier attempts left in it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[int] = set()
        self.counts = Counts()
        for result in _read(path, repair=True):
            self._count(result)
        self._file = open(path, "ab")  # noqa: SIM115 (closed by close())

    def add(self, result: Result) -> None:
        record = {
            "i": result.index,
            "ok": result.ok,
            "usage": [result.prompt_tokens, result.completion_tokens],
            "line": result.line,
        }
        self._file.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self._count(result)

    def sync(self) -> None:
        """Make what was added durable: counts are reported only for results on disk."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def _count(self, result: Result) -> None:
        self.done.add(result.index)
        if result.ok:
            self.counts.completed += 1
        else:
            self.counts.failed += 1
        self.counts.prompt_tokens += result.prompt_tokens
        self.counts.completion_tokens += result.completion_tokens


def read_results(path: Path) -> list[Result]:
    """A finished shard's results in record order."""
    return sorted(_read(path), key=lambda r: r.index)


def _read(path: Path, repair: bool = False) -> list[Result]:
    """The file's complete lines; ``repair`` cuts off a line a killed attempt left half
    written, so appending starts on a fresh line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    whole = data[: data.rfind(b"\n") + 1]
    if repair and len(whole) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    results: dict[int, Result] = {}
    for raw in whole.splitlines():
        record = json.loads(raw)
        prompt, completion = record["usage"]
        results[record["i"]] = Result(record["i"], record["ok"], record["line"], prompt, completion)
    return list(results.values())


def merge(paths: list[Path]) -> tuple[bytes, bytes, Counts]:
    """The output file's and the error file's content from the shards' files (in shard
    order), and the batch's counts."""
    output, errors, counts = bytearray(), bytearray(), Counts()
    for path in paths:
        for result in read_results(path):
            line = json.dumps(result.line, ensure_ascii=False).encode() + b"\n"
            if result.ok:
                output += line
                counts.completed += 1
            else:
                errors += line
                counts.failed += 1
            counts.prompt_tokens += result.prompt_tokens
            counts.completion_tokens += result.completion_tokens
    return bytes(output), bytes(errors), counts

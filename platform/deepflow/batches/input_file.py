"""A batch's input file: checked whole when the batch is created, then split into shards
that each read only their own bytes.

The Files API already checked every line at upload (``deepflow.files.check``: JSON objects,
unique ``custom_id``, ``method``, a known ``url``, a ``body`` with a ``model``); creating a
batch checks again (a file's purpose may not have been ``batch``) and adds what only the batch
knows: every line's ``url`` is its ``endpoint``, and its model is the first line's. Records
are the file's non-blank lines, numbered from 0 in file order (line numbers in messages are
1-based, blank lines included, as the Files API counts them).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepflow import files


class InvalidBatch(ValueError):
    """The file cannot make this batch; the message names the line."""


@dataclass(frozen=True, slots=True)
class InputSummary:
    records: int
    model: str
    """The first line's ``body.model``: the model the batch runs."""
    model_line: int
    """Where the file names it (1-based)."""


def check_input(data: bytes, endpoint: str) -> InputSummary:
    """What the batch will run; InvalidBatch naming the first line that cannot be part of it."""
    try:
        records = files.check("batch", data)
    except files.InvalidFile as exc:
        raise InvalidBatch(str(exc)) from None
    model, model_line = None, 0
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if record["url"] != endpoint:
            raise InvalidBatch(
                f"line {number}: 'url' {record['url']!r} does not match the batch's endpoint "
                f"{endpoint!r} (a batch runs one endpoint)"
            )
        if model is None:
            model, model_line = record["body"]["model"], number
    assert model is not None  # files.check refuses a file without records
    return InputSummary(records, model, model_line)


@dataclass(frozen=True, slots=True)
class ShardRange:
    """A shard's part of the file: bytes [start, end), holding records first .. first+count-1."""

    start: int
    end: int
    first: int
    count: int


def split(path: Path, num_shards: int) -> list[ShardRange]:
    """``num_shards`` consecutive ranges of as equal a number of records as can be."""
    data = path.read_bytes()
    starts: list[int] = []
    position = 0
    for line in data.splitlines(keepends=True):
        if line.strip():
            starts.append(position)
        position += len(line)
    n = len(starts)
    bounds = [n * i // num_shards for i in range(num_shards + 1)]

    def offset(record: int) -> int:
        return starts[record] if record < n else len(data)

    return [ShardRange(offset(a), offset(b), a, b - a) for a, b in itertools.pairwise(bounds)]


def read_shard(path: Path, shard: ShardRange) -> Iterator[tuple[int, dict[str, Any]]]:
    """(record number, record) of the shard's lines, in file order."""
    with open(path, "rb") as f:
        f.seek(shard.start)
        data = f.read(shard.end - shard.start)
    index = shard.first
    for line in data.splitlines():
        if line.strip():
            yield index, json.loads(line)
            index += 1

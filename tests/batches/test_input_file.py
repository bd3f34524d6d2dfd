"""A batch's input file: the check at creation names the offending line; shards split the
records evenly and read back exactly their own; a shard's results survive a killed attempt
and merge in input order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepflow.batches import InvalidBatch, check_input
from deepflow.batches.input_file import read_shard, split
from deepflow.batches.results import Result, ShardResults, merge, output_line
from tests.batches.conftest import chat_line, completion_line, jsonl

CHAT = "/v1/chat/completions"


def test_a_good_file_names_its_model_and_counts_its_records() -> None:
    data = b"\n" + jsonl([chat_line("a", "hi", model="m1"), chat_line("b", "yo", model="m2")])
    summary = check_input(data, CHAT)
    assert (summary.records, summary.model, summary.model_line) == (2, "m1", 2)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b'{"custom_id": "a"\n', "line 1: not JSON"),
        (b"", "the file is empty"),
        (b"\n  \n", "the file is empty"),
        (jsonl([chat_line("a", "x"), chat_line("a", "y")]), "line 2: custom_id 'a' repeats line 1"),
        (
            jsonl([chat_line("a", "x"), {**chat_line("b", "y"), "url": "/v1/embeddings"}]),
            "line 2: 'url' '/v1/embeddings' is not one of",
        ),
        (
            jsonl([chat_line("a", "x"), chat_line("b", "y"), completion_line("c", "z")]),
            "line 3: 'url' '/v1/completions' does not match the batch's endpoint "
            "'/v1/chat/completions'",
        ),
        (jsonl([{**chat_line("a", "x"), "body": {}}]), "line 1: 'body' must be an object"),
    ],
)
def test_a_bad_file_is_refused_naming_the_line(data: bytes, says: str) -> None:
    with pytest.raises(InvalidBatch) as info:
        check_input(data, CHAT)
    assert str(info.value).startswith(says), str(info.value)


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_shards_cover_every_record_once_in_order(tmp_path: Path, num_shards: int) -> None:
    records = [chat_line(f"r{i}", "ü" * i) for i in range(7)]
    ends = ["\r\n", "\n\n"]  # CRLF, and blank lines between records
    text = "".join(json.dumps(r, ensure_ascii=False) + ends[i % 2] for i, r in enumerate(records))
    path = tmp_path / "in.jsonl"
    path.write_bytes(text.encode())
    shards = split(path, num_shards)
    assert len(shards) == num_shards
    assert sorted({s.count for s in shards}) in ([7 // num_shards, -(-7 // num_shards)], [1], [7])
    read = [(i, r["custom_id"]) for s in shards for i, r in read_shard(path, s)]
    assert read == [(i, f"r{i}") for i in range(7)]
    firsts = [sum(t.count for t in shards[:k]) for k in range(num_shards)]
    assert [s.first for s in shards] == firsts


def _result(i: int, ok: bool = True) -> Result:
    return Result(i, ok, output_line(f"r{i}", 200 if ok else 400, {"n": i}), 3, 2 if ok else 0)


def test_a_retried_shard_keeps_what_the_killed_attempt_wrote(tmp_path: Path) -> None:
    path = tmp_path / "shard_0.jsonl"
    first = ShardResults(path)
    for i in (2, 0, 1):
        first.add(_result(i, ok=i != 1))
    first.sync()
    first.close()
    with open(path, "ab") as f:  # killed halfway through its next line
        f.write(b'{"i": 3, "ok": tr')
    again = ShardResults(path)
    assert again.done == {0, 1, 2}
    assert (again.counts.completed, again.counts.failed) == (2, 1)
    assert (again.counts.prompt_tokens, again.counts.completion_tokens) == (9, 4)
    again.add(_result(3))
    again.close()
    output, errors, counts = merge([path])
    assert [json.loads(line)["custom_id"] for line in output.splitlines()] == ["r0", "r2", "r3"]
    assert [json.loads(line)["custom_id"] for line in errors.splitlines()] == ["r1"]
    assert (counts.completed, counts.failed) == (3, 1)


def test_merge_orders_results_across_shards(tmp_path: Path) -> None:
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path, indexes in zip(paths, ([1, 0], [3, 2, 4]), strict=True):
        shard = ShardResults(path)
        for i in indexes:
            shard.add(_result(i, ok=i != 2))
        shard.close()
    output, errors, _ = merge(paths)
    assert [json.loads(x)["custom_id"] for x in output.splitlines()] == ["r0", "r1", "r3", "r4"]
    line = json.loads(errors)
    assert line["custom_id"] == "r2" and line["response"]["status_code"] == 400
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert set(line["response"]) == {"status_code", "request_id", "body"}

"""The ``batch`` job kind's operators: split the input file, run each shard through an
offline engine on a worker, merge the shards' results into the output and error files.

``run_shard`` runs on a worker of the batch's resource class (it holds that worker's device for
the shard). The others only read and write files and rows.

A plugin of the operator registry: ``OPERATORS`` is what our pyproject's
``deepflow.operators`` entry point (``batch``) hands it. Importing registers nothing.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from deepflow import files
from deepflow.batches import input_file, results
from deepflow.batches.constants import PROGRESS_EVERY, PROGRESS_EVERY_S
from deepflow.batches.input_file import ShardRange
from deepflow.config import Settings
from deepflow.dag.operators import Operator, OperatorFailed
from deepflow.store import Batch, Database, get_database
from deepflow.store import files as file_rows
from deepflow.store.batches import (
    batch_of_job,
    mark_finalizing,
    mark_in_progress,
    report_progress,
    set_result_files,
)
from deepflow.store.types import new_id


def _db() -> Database:
    return get_database(Settings.from_env().database_url)


def _batch(db: Database, context: dict[str, Any]) -> Batch:
    with db.transaction() as session:
        batch = batch_of_job(session, context["job_id"])
        session.expunge(batch)
        return batch


def _input(home: Path, batch: Batch) -> Path:
    path = files.path(home, batch.tenant_id, batch.input_file_id)
    if not path.is_file():
        raise OperatorFailed(f"the input file {batch.input_file_id} was deleted")
    return path


def split_input(args: dict[str, Any]) -> dict[str, Any]:
    """The shards' byte ranges of the input file; the batch is in progress from here."""
    db, home = _db(), Settings.from_env().home
    batch = _batch(db, args["context"])
    shards = input_file.split(_input(home, batch), args["num_shards"])
    with db.transaction() as session:
        mark_in_progress(session, batch.id)
    return {"batch_id": batch.id, "shards": [asdict(s) for s in shards]}


def run_shard(args: dict[str, Any]) -> dict[str, Any]:
    """Run the shard's requests not yet in its results file; report counts as they finish."""
    from deepflow.batches.runner import ShardRunner  # the engine: torch, on the worker only
    from deepflow.engine.llm import LLM

    db, home = _db(), Settings.from_env().home
    context, shard = args["context"], args["shard"]
    batch = _batch(db, context)
    span = ShardRange(**context["upstream"]["split_input"]["shards"][shard])
    path = _input(home, batch)
    done = results.ShardResults(results.shard_path(home, batch.id, shard))
    progress = _Progress(db, batch.id, shard, done)
    timing = {"load_s": 0.0, "run_s": 0.0}
    try:
        if len(done.done) < span.count:
            start = time.perf_counter()
            runner = ShardRunner(LLM(batch.model_uri), batch.model, batch.endpoint)
            loaded = time.perf_counter()
            todo = ((i, r) for i, r in input_file.read_shard(path, span) if i not in done.done)
            runner.run(todo, progress.add)
            timing = {"load_s": loaded - start, "run_s": time.perf_counter() - loaded}
        progress.report()
    finally:
        done.close()
    counts = done.counts
    return {"shard": shard, "completed": counts.completed, "failed": counts.failed, **timing}


class _Progress:
    """Appends each result and reports the shard's counts every PROGRESS_EVERY results or
    PROGRESS_EVERY_S seconds; stops the shard once its batch's job has ended."""

    def __init__(self, db: Database, batch_id: str, shard: int, done: results.ShardResults):
        self.db, self.batch_id, self.shard, self.done = db, batch_id, shard, done
        self.unreported = 0
        self.reported_at = time.monotonic()

    def add(self, result: results.Result) -> None:
        self.done.add(result)
        self.unreported += 1
        due = time.monotonic() - self.reported_at >= PROGRESS_EVERY_S
        if due or self.unreported >= PROGRESS_EVERY:
            self.report()

    def report(self) -> None:
        self.done.sync()
        with self.db.transaction() as session:
            live = report_progress(session, self.batch_id, self.shard, self.done.counts)
        if not live:
            raise OperatorFailed(f"batch {self.batch_id} has ended (cancelled or expired)")
        self.unreported, self.reported_at = 0, time.monotonic()


def merge_results(args: dict[str, Any]) -> dict[str, Any]:
    """Write the output file (the answered requests) and the error file (the refused ones),
    each in input order, as the tenant's ``batch_output`` files. Done once: a retry finds
    the files recorded."""
    db, home = _db(), Settings.from_env().home
    batch = _batch(db, args["context"])
    with db.transaction() as session:
        mark_finalizing(session, batch.id)
    if batch.output_file_id or batch.error_file_id:
        return {"output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id}
    paths = [results.shard_path(home, batch.id, i) for i in range(args["num_shards"])]
    output, errors, counts = results.merge(paths)
    if counts.completed + counts.failed != batch.total:
        raise OperatorFailed(
            f"the shards hold {counts.completed + counts.failed} results of {batch.total}"
        )
    parts = {"output": (output, counts.completed), "error": (errors, counts.failed)}
    ids: dict[str, str | None] = {}
    with db.transaction() as session:
        for kind, (data, lines) in parts.items():
            ids[kind] = _save(session, home, batch, kind, data, lines) if lines else None
        set_result_files(session, batch.id, ids["output"], ids["error"])
    shutil.rmtree(results.folder(home, batch.id), ignore_errors=True)
    return {
        "output_file_id": ids["output"],
        "error_file_id": ids["error"],
        "completed": counts.completed,
        "failed": counts.failed,
    }


def _save(session: Session, home: Path, batch: Batch, kind: str, data: bytes, lines: int) -> str:
    """One result file, as the Files API stores an upload: content first, then its row."""
    file_id = new_id("file")
    sha256 = files.save(home, batch.tenant_id, file_id, data)
    name = f"{batch.id}_{kind}.jsonl"
    file_rows.add_file(
        session, file_id, batch.tenant_id, "batch_output", name, len(data), sha256, lines
    )
    return file_id


OPERATORS = (
    Operator(
        "batch.split_input",
        split_input,
        description="Splits the input file into shards.",
        takes_context=True,
        internal=True,
    ),
    Operator(
        "batch.run_shard",
        run_shard,
        description="Runs one shard's requests through an offline engine.",
        takes_context=True,
        internal=True,
    ),
    Operator(
        "batch.merge_results",
        merge_results,
        description="Writes the output and error files in the input's order.",
        takes_context=True,
        internal=True,
    ),
)

"""The store's side of batches, on SQLite and PostgreSQL: shards' counts add up and stop at a
cancel, a cancel is ``cancelling`` until the running shard's attempt has logged its end, and a
batch past its window expires."""

from __future__ import annotations

from datetime import timedelta

from deepflow import dag
from deepflow.batches import batch_status
from deepflow.store import (
    Batch,
    Database,
    cancel_batch,
    claim_task,
    create_batch,
    create_job,
    ensure_tenant,
    list_batches,
    queue_task,
    read_batch,
    read_job,
)
from deepflow.store.batches import Counts, mark_finalizing, mark_in_progress, report_progress
from deepflow.store.logs import write_task_log
from deepflow.store.types import new_id, utcnow


def _batch(db: Database, shards: int = 2, window_s: float = 3600.0) -> Batch:
    spec = {"model": "tiny", "input_file": "file-1", "num_shards": shards}
    with db.transaction() as s:
        tenant = ensure_tenant(s, "acme")
        job, _ = create_job(s, tenant.id, dag.plan("batch", spec), "batch")
        batch = Batch(
            id=new_id("batch"),
            tenant_id=tenant.id,
            job_id=job.id,
            input_file_id="file-1",
            endpoint="/v1/chat/completions",
            completion_window="24h",
            model="tiny",
            model_uri="/models/tiny",
            total=10,
        )
        create_batch(s, batch, shards, window_s)
        s.expunge(batch)
        return batch


def test_counts_add_up_over_shards_and_phases_show_in_the_status(db: Database) -> None:
    batch = _batch(db)
    with db.transaction() as s:
        view = read_batch(s, batch.tenant_id, batch.id)
        assert batch_status(view) == "validating" and view.counts == Counts()
        mark_in_progress(s, batch.id)
        assert report_progress(s, batch.id, 0, Counts(3, 1, 30, 12))
        assert report_progress(s, batch.id, 1, Counts(2, 0, 20, 8))
        assert report_progress(s, batch.id, 0, Counts(4, 1, 40, 16))  # absolute, not added
    with db.transaction() as s:
        view = read_batch(s, batch.tenant_id, batch.id)
        assert batch_status(view) == "in_progress"
        assert view.counts == Counts(6, 1, 60, 24)
        mark_finalizing(s, batch.id)
        assert batch_status(read_batch(s, batch.tenant_id, batch.id)) == "finalizing"
        assert [v.batch.id for v in list_batches(s, batch.tenant_id).batches] == [batch.id]


def test_a_cancel_freezes_the_counts_and_waits_for_the_running_attempt(db: Database) -> None:
    batch = _batch(db)
    with db.transaction() as s:
        job = read_job(s, batch.tenant_id, batch.job_id)
        shard = next(t for t in job.tasks if t.name == "run_shard_0")
        queue_task(s, shard)
    with db.transaction() as s:
        assert claim_task(s, shard.id, "worker-1", 1, 30.0) is not None
        assert report_progress(s, batch.id, 0, Counts(2, 0, 10, 4))
    with db.transaction() as s:
        view = cancel_batch(s, batch.tenant_id, batch.id)
        assert batch_status(view) == "cancelling" and view.batch.cancelling_at is not None
        assert not report_progress(s, batch.id, 0, Counts(5, 0, 25, 10))
    with db.transaction() as s:
        view = read_batch(s, batch.tenant_id, batch.id)
        assert batch_status(view) == "cancelling" and view.counts == Counts(2, 0, 10, 4)
        now = utcnow()
        write_task_log(
            s, shard, 1, outcome="stopped", text="", dropped_chars=0, started_at=now,
            finished_at=now,
        )  # fmt: skip
    with db.transaction() as s:
        assert batch_status(read_batch(s, batch.tenant_id, batch.id)) == "cancelled"


def test_a_batch_past_its_window_expires(db: Database) -> None:
    batch = _batch(db, window_s=0.0)
    with db.transaction() as s:
        view = read_batch(s, batch.tenant_id, batch.id)
        assert batch_status(view) == "expired" and view.batch.expired_at is not None
        assert read_job(s, batch.tenant_id, batch.job_id).state == "cancelled"
        assert view.batch.expires_at - view.batch.created_at == timedelta(0)
        assert not report_progress(s, batch.id, 0, Counts(1, 0, 1, 1))

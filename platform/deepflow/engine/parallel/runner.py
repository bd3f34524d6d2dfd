"""Rank 0 of a tensor-parallel group, behind the engine's Runner protocol (engine/runner.py).

The engine process is rank 0: it keeps the scheduler, holds its own shard in a ModelRunner
(which also samples: the LM head's all-gather leaves the full logits there), and starts one
worker process per other rank. Each step it sends the step to every
worker over that worker's socket pair, then runs its shard; all ranks meet in the same
collectives, and the LM head's all-gather leaves the full logits on rank 0.

Why a socket pair per worker rather than a broadcast on the process group: the step is a few
Python ints that rank 0 already holds on the host, and a worker needs them on the host too
(chunk lengths drive its control flow); a pipe write is tens of microseconds with no device
sync and no polling, and the same pipe tells a worker when rank 0 is gone (EOF) and carries a
worker's traceback back. An NCCL broadcast would need a device round trip on every worker.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import torch
import torch.distributed as dist

from deepflow.engine.config import EngineConfig
from deepflow.engine.model_config import ModelConfig
from deepflow.engine.model_runner import ModelRunner
from deepflow.engine.outputs import PendingTokens, SampledBatch, SchedulerOutput, StepSequence
from deepflow.engine.parallel.group import TPGroup
from deepflow.engine.parallel.step import STOP, pack
from deepflow.engine.parallel.worker import HOST, STORE_TIMEOUT, WorkerSetup, join_group

if TYPE_CHECKING:
    from deepflow.engine.sequence import Sequence

SOURCE_ROOT = Path(__file__).resolve().parents[3]
"""The folder holding the deepflow package: a worker's interpreter must import it."""
STOP_GRACE_S = 10.0
FAILURE_WAIT_S = 2.0
"""After rank 0 fails, how long it waits for a worker's reason (its traceback or exit)."""


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed or died; the group has been shut down."""


def check_shardable(cfg: ModelConfig, size: int) -> None:
    """Raise the error a rank would meet building its shard, before any process starts."""
    tp = TPGroup(0, size)
    tp.even(cfg.num_heads, "num_attention_heads")
    tp.kv_heads(cfg.num_kv_heads)
    tp.even(cfg.intermediate_size, "intermediate_size")


def make_runner(config: EngineConfig) -> ModelRunner | TensorParallelRunner:
    if config.tensor_parallel_size == 1:
        return ModelRunner(config)
    return TensorParallelRunner(config)


@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen[bytes]
    conn: Connection

    def exited(self, wait_s: float = 0.0) -> WorkerError | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(wait_s)
        code = self.proc.returncode
        if code is None:
            return None
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited ({code})"
        return WorkerError(f"tensor-parallel worker {self.rank} (pid {self.proc.pid}) {how}")

    def receive(self) -> tuple[Any, ...]:
        """The worker's next message; its traceback or its death as a WorkerError."""
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            raise self.exited(STOP_GRACE_S) or WorkerError(
                f"tensor-parallel worker {self.rank} closed its connection"
            ) from None
        if message[0] == "error":
            raise WorkerError(f"tensor-parallel worker {self.rank} failed:\n{message[1]}")
        return message


@dataclass
class _Group:
    """What the finaliser needs to stop the workers, without holding the runner alive."""

    workers: list[_Worker] = field(default_factory=list)
    joined: bool = False


def _stop(group: _Group, grace_s: float) -> None:
    for worker in group.workers:
        with contextlib.suppress(OSError):
            worker.conn.send_bytes(STOP)
    if group.joined and dist.is_initialized():
        dist.destroy_process_group()  # also frees a worker stuck in a collective (gloo)
        group.joined = False
    deadline = time.monotonic() + grace_s
    for worker in group.workers:
        try:
            worker.proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
        worker.conn.close()


def _start_worker(config: EngineConfig, rank: int, store_port: int) -> _Worker:
    ours, theirs = multiprocessing.Pipe()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    fd = theirs.fileno()
    command = [sys.executable, "-m", "deepflow.engine.parallel.worker", str(fd)]
    proc = subprocess.Popen(command, pass_fds=(fd,), env=env)
    theirs.close()
    ours.send(WorkerSetup(config, rank, store_port, torch.get_num_threads(), os.getpid()))
    return _Worker(rank, proc, ours)


class TensorParallelRunner:
    """The Runner protocol for `config.tensor_parallel_size` ranks. execute() takes the previous
    step's samples on the device too: they are broadcast to the workers after the step's
    message (the engine's async scheduling). `shutdown()` stops the workers; so do garbage
    collection and interpreter exit, and a worker exits by itself when this process dies."""

    def __init__(self, config: EngineConfig) -> None:
        size = config.tensor_parallel_size
        check_shardable(ModelConfig.from_folder(config.model), size)
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process; a tensor-parallel "
                "engine needs its own default process group"
            )
        self.tp = TPGroup(0, size)
        self._group = _Group()
        self._finalizer = weakref.finalize(self, _stop, self._group, 1.0)
        self._closed = False
        device = self.tp.device(config.device)
        self._store = dist.TCPStore(
            HOST, 0, size, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT
        )
        try:
            for rank in range(1, size):
                self._group.workers.append(_start_worker(config, rank, self._store.port))
            self._await("hello")
            join_group(self.tp, device.dist_backend, self._store)
            self._group.joined = True
            self.runner = ModelRunner(config, self.tp)
            worker_blocks = [int(m[1]) for m in self._await("ready")]
        except BaseException as exc:
            self._fail(exc)
        self.config = config
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.model_config = self.runner.model_config
        self.block_size = self.runner.block_size
        self.max_model_len = self.runner.max_model_len
        self.model = self.runner.model
        """Rank 0's shard, to inspect (its forward alone would wait forever in a collective)."""
        self.graphs = None
        """Whatever rank 0 captured could not be replayed without the other ranks."""
        self.vocab_size = self.model_config.vocab_size
        # Free device memory may differ between devices: schedule for the smallest cache.
        self.num_blocks = min(self.runner.num_blocks, *worker_blocks)

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._group.workers]

    def execute(
        self, batch: SchedulerOutput[StepSequence], pending: PendingTokens | None = None
    ) -> None:
        """ModelRunner.execute on every rank; the full logits stay on rank 0's device."""
        if self._closed:
            raise WorkerError("the tensor-parallel group was shut down")
        for chunk in batch.chunks:
            end = chunk.start + chunk.num_tokens
            if end > self.max_model_len:  # refused before any rank sees the step
                raise ValueError(
                    f"sequence {chunk.seq.seq_id} reaches {end} tokens > max_model_len"
                )
        spec = None if pending is None else (len(pending.tokens), pending.rows)
        message = pack(batch, self.block_size, spec)
        try:
            for worker in self._group.workers:
                died = worker.exited()
                if died is not None:
                    raise died
                worker.conn.send_bytes(message)
            if pending is None:
                self.runner.execute(batch)
                return
            self.tp.broadcast(pending.tokens.to(torch.int64).contiguous())
            self.runner.execute(batch, pending)
        except BaseException as exc:
            self._fail(exc)

    def sample(
        self, seqs: list[Sequence], eos_token_ids: list[int], rows: list[int] | None = None
    ) -> SampledBatch:
        """Rank 0 samples alone: the workers' logits are the same rows and are dropped."""
        return self.runner.sample(seqs, eos_token_ids, rows)

    @property
    def logits(self) -> torch.Tensor:
        """The last step's full logits, on rank 0."""
        return self.runner.logits

    def shutdown(self) -> None:
        """Stop every worker (killing any that does not stop within a grace period)."""
        if not self._closed:
            self._closed = True
            self._finalizer.detach()
            _stop(self._group, STOP_GRACE_S)

    def _await(self, kind: str) -> list[tuple[Any, ...]]:
        """Every worker's next message, which must be `kind`, in rank order."""
        pending = {w.conn: w for w in self._group.workers}
        got: dict[int, tuple[Any, ...]] = {}
        while pending:
            for conn in wait(list(pending), timeout=1.0):
                worker = pending.pop(cast(Connection, conn))  # wait() returns what it got
                message = worker.receive()
                if message[0] != kind:
                    raise WorkerError(f"worker {worker.rank} said {message[0]!r}, not {kind!r}")
                got[worker.rank] = message
            for worker in pending.values():
                died = worker.exited()
                if died is not None:
                    raise died
        return [got[rank] for rank in sorted(got)]

    def _failure(self) -> WorkerError | None:
        """Why a worker failed, if one did: its traceback, or its exit."""
        deadline = time.monotonic() + FAILURE_WAIT_S
        while True:
            for worker in self._group.workers:
                if worker.conn.poll():
                    try:
                        worker.receive()
                    except WorkerError as error:
                        return error
                died = worker.exited()
                if died is not None:
                    return died
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def _fail(self, exc: BaseException) -> NoReturn:
        failure = exc if isinstance(exc, WorkerError) else self._failure()
        self._closed = True
        self._finalizer.detach()
        _stop(self._group, 1.0)
        if failure is None or failure is exc:
            raise exc
        raise failure from exc

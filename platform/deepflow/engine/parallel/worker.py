"""A tensor-parallel worker: one rank other than 0, in a process of its own.

The runner starts it as `python -m deepflow.engine.parallel.worker FD` (a fresh interpreter,
never a fork of rank 0, whose device context a child must not inherit). FD is the worker's end
of a socket pair to rank 0: the setup arrives on it, then one message per step. The worker
answers 'hello' (imported, about to join the group), 'ready' (shard loaded, with its number of
KV blocks) and, if anything fails, the traceback. It exits when told to, when rank 0's end
closes, or when its parent process is gone: checked every second, for a rank 0 killed while
this rank waits in a collective that will never complete.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from deepflow.engine.config import EngineConfig
from deepflow.engine.model_runner import ModelRunner
from deepflow.engine.outputs import PendingTokens
from deepflow.engine.parallel.group import TPGroup
from deepflow.engine.parallel.step import STOP, PendingSpec, unpack

HOST = "127.0.0.1"
STORE_TIMEOUT = timedelta(minutes=5)
"""How long joining the group may wait for a peer; every rank has already said 'hello'."""


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    config: EngineConfig
    rank: int
    store_port: int
    threads: int
    """Intra-op threads, as many as rank 0 uses: ranks sharing a CPU must not oversubscribe."""
    parent_pid: int


def join_group(tp: TPGroup, backend: str, store: dist.Store) -> None:
    dist.init_process_group(backend, store=store, rank=tp.rank, world_size=tp.size)


def serve(conn: Connection, setup: WorkerSetup) -> None:
    torch.set_num_threads(setup.threads)
    tp = TPGroup(setup.rank, setup.config.tensor_parallel_size)
    device = tp.device(setup.config.device)
    device.set_current()
    conn.send(("hello",))
    store = dist.TCPStore(HOST, setup.store_port, tp.size, is_master=False, timeout=STORE_TIMEOUT)
    join_group(tp, device.dist_backend, store)
    try:
        runner = ModelRunner(setup.config, tp)
        conn.send(("ready", runner.num_blocks))
        while True:
            try:
                message = conn.recv_bytes()
            except EOFError:  # rank 0 is gone
                return
            if message == STOP:
                return
            batch, pending = unpack(message)
            if pending is None:
                runner.execute(batch)  # rank 0 samples; our logits are dropped
            else:
                runner.execute(batch, receive_pending(tp, pending, runner.device.torch_device))
    finally:
        dist.destroy_process_group()


def receive_pending(tp: TPGroup, spec: PendingSpec, device: torch.device) -> PendingTokens:
    """The previous step's samples, broadcast by rank 0 right after the step's message."""
    count, rows = spec
    tokens = tp.broadcast(torch.empty(count, dtype=torch.int64, device=device))
    return PendingTokens(tokens, rows)


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-rank-0", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    conn = Connection(int(argv[0]))
    try:
        setup: WorkerSetup = conn.recv()
        _exit_with_parent(setup.parent_pid)
        serve(conn, setup)
    except Exception:
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            conn.send(("error", text))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

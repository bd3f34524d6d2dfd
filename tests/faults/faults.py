"""The faults the suite injects, each a function of the rig and its running load that
returns how to heal it when it lasts (``rig.Inject``)."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable

from tests.faults.rig import Load, Rig
from tests.replicas.conftest import port_free


def _kill_part(marker: str) -> Callable[[Rig, Load], None]:
    def inject(rig: Rig, load: Load) -> None:
        # the part leads its process group: its own children (a pool, a server) go with it
        os.killpg(rig.part_pid(marker), signal.SIGKILL)

    return inject


def kill_engine(rig: Rig, load: Load) -> None:
    pids = rig.instance_pids()
    assert pids, "no ready instance to kill"
    os.kill(pids[0], signal.SIGKILL)


def restart_redis(rig: Rig, load: Load) -> None:
    rig.redis.restart()


def restart_postgres(rig: Rig, load: Load) -> None:
    rig.pg.restart()
    assert rig.db is not None
    rig.db.engine.dispose()  # the rig's own pooled connections died with the server


def restart_api(rig: Rig, load: Load) -> None:
    assert rig.api_proc is not None
    rig.api_proc.terminate()  # as a deploy restarts it: in-flight requests finish first
    rig.api_proc.wait(60)
    rig.start_api()


def kill_up(rig: Rig, load: Load) -> None:
    """SIGKILL ``deepflow up`` (its parts follow it: each dies with its parent), then start
    it again on the same home, as a user or a supervisor would."""
    assert rig.up_proc is not None
    rig.up_proc.kill()
    rig.up_proc.wait()
    deadline = time.monotonic() + 60
    while not all(port_free(p) for p in (rig.up_port, rig.prefect_port)):
        assert time.monotonic() < deadline, "the parts of the killed `up` kept its ports"
        time.sleep(0.2)
    rig.start_up()


BURST = 12
BURST_TOKENS = 120


def fill_kv_cache(rig: Rig, load: Load) -> None:
    """A burst of long chats that needs several times the instance's KV cache."""
    threads = [
        threading.Thread(target=rig.chat_once, args=(load, 900_000 + i, BURST_TOKENS))
        for i in range(BURST)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def fill_disk(rig: Rig, load: Load) -> Callable[[], None]:
    """Fill the disk of DEEPFLOW_HOME (logs, Prefect's database) to the last byte."""
    assert rig.tmpfs, "the rig's home is not on a disk of its own"
    ballast = rig.home / "ballast"
    chunk = b"\0" * 2**20
    with open(ballast, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
                f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]

    def heal() -> None:
        ballast.unlink()

    return heal


FAULTS: dict[str, Callable[[Rig, Load], Callable[[], None] | None]] = {
    "SIGKILL a Celery worker": _kill_part("deepflow.cli worker"),
    "SIGKILL an engine daemon": kill_engine,
    "restart Redis (queues lost)": restart_redis,
    "restart PostgreSQL (immediate)": restart_postgres,
    "SIGKILL the Prefect server": _kill_part("prefect server start"),
    "restart the API": restart_api,
    "fill the KV cache": fill_kv_cache,
    "SIGKILL deepflow up, start it again": kill_up,
    "fill the disk": fill_disk,  # last: the jobs accepted while it fills are a backlog after
}

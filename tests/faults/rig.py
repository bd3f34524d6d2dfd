"""The fault rig: the platform as users run it (``deepflow up``) on a PostgreSQL and a Redis of
its own, a second API process (``deepflow api``: the front the load talks to, as one replica
behind a load balancer), a deployment of the tiny model, and a mixed load of DAG jobs and
streaming chats. ``round(fault)`` runs the load, injects the fault, and checks what the
platform promises: every accepted job ends, no task runs twice at once, no job's history
has a gap, the deployment returns to its replica count, and no request is lost (it either
completes or fails with an error the client is shown; none hangs past its timeout).

Shared by ``tests/faults`` (one round of each fault, in CI) and ``bench/faults.py`` (more
rounds, longer load).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from deepflow.launcher import free_port
from deepflow.replicas.supervisor import stop_local_instances
from deepflow.store import Database, Event, Instance, Job, Task
from deepflow.store.orm import TaskLog
from tests.faults.servers import Postgres, Redis
from tests.replicas.conftest import MODEL, live_processes, register_model

REPO = Path(__file__).resolve().parents[2]
TENANT = "default"  # the tenant of the key `deepflow up` makes
TERMINAL = {"succeeded", "failed", "cancelled"}
CHAT_TIMEOUT_S = 60.0
"""A chat that has not ended this long after it was sent is lost (it hangs)."""
SETTLE_S = 180.0
"""The most the rig waits, after the load stops, for every accepted job to end."""
RECOVERY_S = 180.0
"""The most the platform may take to serve a job and a chat again after a fault."""
KV_BLOCKS = 24
"""The deployment's KV cache, in blocks of 16 tokens: small, so a burst can fill it."""


@dataclass
class Load:
    """What the load saw in one round."""

    jobs: list[str] = field(default_factory=list)
    job_refusals: int = 0
    """POSTs never accepted (the API unreachable or failing for the whole retry window)."""
    chats: Counter[str] = field(default_factory=Counter)
    """Chats by outcome: ok, failed (an HTTP error or an error event: the client was told),
    lost (no end before CHAT_TIMEOUT_S, or a stream cut without an error)."""
    lost_examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def chat(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.chats[outcome] += 1
            if outcome == "lost" and len(self.lost_examples) < 5:
                self.lost_examples.append(detail)


@dataclass
class Row:
    fault: str
    jobs_accepted: int
    jobs_finished: int
    jobs_failed: int
    tasks_retried: int
    chats_ok: int
    requests_failed_cleanly: int
    requests_lost: int
    recovery_s: float | None
    """None: the platform did not serve again within the round's bound."""
    problems: list[str]
    recovered: str = ""
    """When the load's last request ended, and when the new job, the chat and the replicas each
    came back, in seconds from the fault."""

    HEADER = (
        "fault",
        "jobs accepted",
        "jobs finished",
        "of which failed",
        "tasks retried",
        "chats ok",
        "requests failed cleanly",
        "requests lost",
        "recovery (s)",
    )

    def cells(self) -> tuple[str, ...]:
        return (
            self.fault,
            str(self.jobs_accepted),
            str(self.jobs_finished),
            str(self.jobs_failed),
            str(self.tasks_retried),
            str(self.chats_ok),
            str(self.requests_failed_cleanly),
            str(self.requests_lost),
            "not recovered" if self.recovery_s is None else f"{self.recovery_s:.1f}",
        )


def table(rows: list[Row]) -> str:
    cells = [Row.HEADER, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(Row.HEADER))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid``, with their command lines."""
    found = {}
    for child, parent, _ in live_processes():
        if parent != pid:
            continue
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                found[child] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


Inject = Callable[["Rig", Load], Callable[[], None] | None]
"""A fault: does it to the rig (with the load running) and returns how to heal it, if it
lasts until healed (a full disk)."""


class Rig:
    def __init__(self, root: Path, model_folder: Path, disk_bytes: int | None = None) -> None:
        self.root = root
        self.model_folder = model_folder
        self.pg = Postgres()
        self.redis = Redis(root / "redis")
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.tmpfs = False
        if disk_bytes is not None:  # the home on a small disk of its own, to fill
            mount = ["mount", "-t", "tmpfs", "-o", f"size={disk_bytes}", "tmpfs", str(self.home)]
            self.tmpfs = subprocess.run(mount, capture_output=True).returncode == 0
        self.up_port, self.api_port, self.prefect_port = free_port(), free_port(), free_port()
        self.up_proc: subprocess.Popen[bytes] | None = None
        self.api_proc: subprocess.Popen[bytes] | None = None
        self.key = ""
        self.deployment_id = ""
        self.db: Database | None = None
        self.http = httpx.Client(timeout=30)
        self.extra_env: dict[str, str] = {}
        """More environment for the platform's processes (a benchmark's variant)."""

    # -- the platform -------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DEEPFLOW_HOME": str(self.home),
            "DEEPFLOW_DATABASE_URL": self.pg.url,
            "DEEPFLOW_BROKER_URL": self.redis.url,
            "DEEPFLOW_API_PORT": str(self.up_port),
            "DEEPFLOW_PREFECT_PORT": str(self.prefect_port),
            "DEEPFLOW_LEASE_TTL_S": "3",
            "DEEPFLOW_RECONCILE_INTERVAL_S": "0.5",
            "DEEPFLOW_DRIVER_TTL_S": "6",
            "DEEPFLOW_OPERATORS": "tests.integration.operators",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **self.extra_env,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def start(self) -> Rig:
        self.pg.start()
        self.redis.start()
        self.start_up()
        self.key = (self.home / "api_key").read_text().strip()
        self.db = Database(self.pg.url)
        self.start_api()
        register_model(self.db, self.model_folder, TENANT)
        r = self.http.post(
            f"{self.url}/v1/deployments",
            json={
                "model": MODEL,
                "replicas": 1,
                "engine_args": {"num_kv_blocks": KV_BLOCKS, "max_num_seqs": 16},
            },
            headers=self.headers(),
        )
        assert r.status_code == 201, r.text
        self.deployment_id = r.json()["id"]
        self.wait_deployment_ready(RECOVERY_S)
        return self

    def start_up(self, timeout_s: float = 180.0) -> None:
        with open(self.root / "up.log", "ab") as log:
            self.up_proc = subprocess.Popen(
                [sys.executable, "-m", "deepflow.cli", "up", "--no-model"],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_health(f"http://127.0.0.1:{self.up_port}/health", self.up_proc, timeout_s)
        deadline = time.monotonic() + timeout_s  # the banner is printed once all parts run
        while "DeepFlow is up" not in (self.root / "up.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, "deepflow up did not come up"
            time.sleep(0.2)

    def start_api(self, timeout_s: float = 60.0) -> None:
        with open(self.root / "api.log", "ab") as log:
            self.api_proc = subprocess.Popen(
                [sys.executable, "-m", "deepflow.cli", "api", "--port", str(self.api_port)],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_health(f"{self.url}/health", self.api_proc, timeout_s)

    def _wait_health(self, url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s")

    def part_pid(self, marker: str) -> int:
        """The pid of ``deepflow up``'s part whose command line holds ``marker``."""
        assert self.up_proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for pid, cmdline in _children(self.up_proc.pid).items():
                if marker in cmdline:
                    return pid
            time.sleep(0.2)
        raise AssertionError(f"no part of deepflow up runs {marker!r}")

    def instance_pids(self) -> list[int]:
        assert self.db is not None
        with self.db.transaction() as s:
            rows = s.execute(
                select(Instance.pid).where(
                    Instance.deployment_id == self.deployment_id, Instance.state == "ready"
                )
            ).scalars()
            return [pid for pid in rows if pid]

    def deployment(self) -> dict[str, Any]:
        r = self.http.get(f"{self.url}/v1/deployments/{self.deployment_id}", headers=self.headers())
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def deployment_ready(self) -> bool:
        try:
            d = self.deployment()
        except httpx.HTTPError:
            return False
        ready = sum(i["state"] == "ready" for i in d["instances"])
        return bool(d["state"] == "ready" and ready == d["replicas"])

    def wait_deployment_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.deployment_ready():
            assert time.monotonic() < deadline, f"deployment not ready: {self.deployment()}"
            time.sleep(0.3)

    def stop(self) -> None:
        for proc in (self.api_proc, self.up_proc):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT if proc is self.up_proc else signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.db is not None:
            stop_local_instances(self.db)
            self.db.dispose()
        self._kill_leftovers()
        self.redis.kill()
        self.pg.remove()
        if self.tmpfs:  # the logs outlive the disk they were on
            shutil.copytree(self.home / "logs", self.root / "logs", dirs_exist_ok=True)
            subprocess.run(["umount", "-l", str(self.home)], capture_output=True)

    def _kill_leftovers(self) -> None:
        """SIGKILL any process still running with the rig's DEEPFLOW_HOME in its environment
        (every part, flow run, worker and daemon inherits it): a round that broke the platform
        must not leave processes that load the machine for the tests after it."""
        marker = f"DEEPFLOW_HOME={self.home}".encode()
        for pid, _, _ in live_processes():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    ours = marker in f.read().split(b"\0")
            except OSError:
                continue
            if ours and pid != os.getpid():
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # -- the load -----------------------------------------------------------------------
    def job_spec(self, tag: str) -> dict[str, Any]:
        ticks = self.root / "ticks"
        ticks.mkdir(exist_ok=True)

        def tick(name: str, seconds: float, after: list[str]) -> dict[str, Any]:
            return {
                "name": name,
                "operator": "test.tick",
                "args": {"path": str(ticks / f"{tag}-{name}"), "seconds": seconds},
                "depends_on": after,
                "retries": 5,
                "retry_delay_s": 0.5,
            }

        return {"tasks": [tick("a", 0.4, []), tick("b", 0.8, ["a"]), tick("c", 0.3, ["a"])]}

    def submit(self, load: Load, spec: dict[str, Any], retry_s: float = 60.0) -> str | None:
        """POST a job as a careful client does: the same Idempotency-Key until an answer."""
        key = str(uuid.uuid4())
        headers = {**self.headers(), "Idempotency-Key": key}
        deadline = time.monotonic() + retry_s
        while time.monotonic() < deadline:
            try:
                r = self.http.post(
                    f"{self.url}/v1/jobs", json={"kind": "dag", "spec": spec}, headers=headers
                )
                if r.status_code == 201:
                    job_id = str(r.json()["id"])
                    with load.lock:
                        load.jobs.append(job_id)
                    return job_id
                if r.status_code < 500:
                    raise AssertionError(f"job refused: {r.status_code} {r.text}")
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        with load.lock:
            load.job_refusals += 1
        return None

    def chat_once(self, load: Load | None, i: int, max_tokens: int = 24) -> str:
        """One streamed chat; its outcome (recorded in ``load`` if given)."""
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"fault load {i}"}],
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
        }
        outcome, detail = "lost", ""
        timeout = httpx.Timeout(CHAT_TIMEOUT_S, connect=5.0)
        try:
            with httpx.stream(
                "POST",
                f"{self.url}/v1/chat/completions",
                json=body,
                headers=self.headers(),
                timeout=timeout,
            ) as r:
                if r.status_code != 200:
                    r.read()
                    ok_error = "error" in r.json()
                    outcome = "failed" if ok_error else "lost"
                    detail = f"HTTP {r.status_code} {r.text[:200]}"
                else:
                    outcome, detail = self._read_stream(r)
        except httpx.TimeoutException as exc:  # it hung: the client was told nothing
            outcome, detail = "lost", f"{type(exc).__name__}: {exc}"
        except httpx.TransportError:
            # refused, or the connection broken mid-answer: the client knows at once
            outcome = "failed"
        if load is not None:
            load.chat(outcome, detail)
        return outcome

    def _read_stream(self, r: httpx.Response) -> tuple[str, str]:
        started = time.monotonic()
        for line in r.iter_lines():
            if time.monotonic() - started > CHAT_TIMEOUT_S:
                return "lost", "the stream ran past its timeout"
            if line == "data: [DONE]":
                return "ok", ""
            if line.startswith("data: ") and '"error"' in line[:20]:
                return "failed", line[:200]
        return "lost", "the stream ended without [DONE] or an error"

    @contextmanager
    def load(self, chat_streams: int = 2, job_every_s: float = 0.5) -> Iterator[Load]:
        """Run the mixed load until the block ends; then wait for the in-flight requests."""
        load = Load()
        stop = threading.Event()

        def jobs() -> None:
            while not stop.is_set():
                self.submit(load, self.job_spec(f"{uuid.uuid4().hex[:8]}"))
                stop.wait(job_every_s)

        def chats(k: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                if self.chat_once(load, k * 100_000 + i) != "ok":
                    stop.wait(0.5)  # a failing platform is not hammered

        threads = [threading.Thread(target=jobs, daemon=True)]
        threads += [
            threading.Thread(target=chats, args=(k,), daemon=True) for k in range(chat_streams)
        ]
        for t in threads:
            t.start()
        try:
            yield load
        finally:
            stop.set()
            for t in threads:
                t.join(CHAT_TIMEOUT_S + 70)

    # -- checks -------------------------------------------------------------------------
    def recover(self, since: float, bound_s: float = RECOVERY_S) -> tuple[float | None, str]:
        """Seconds from ``since`` (the fault) until a new job finishes and a chat completes
        with the deployment at its replica count (None if not within ``bound_s``), and when
        each of the three came, or that it did not."""
        deadline = since + bound_s
        probe = Load()
        came: dict[str, float] = {}
        while time.monotonic() < deadline and len(came) < 3:
            if "job" not in came:
                spec = {"tasks": [{"name": "probe", "operator": "noop"}]}
                job_id = self.submit(probe, spec, retry_s=max(deadline - time.monotonic(), 1))
                if job_id is not None and self.wait_job(job_id, deadline) == "succeeded":
                    came["job"] = time.monotonic() - since
            if "chat" not in came and self.chat_once(None, 0, max_tokens=4) == "ok":
                came["chat"] = time.monotonic() - since
            if self.deployment_ready():
                came.setdefault("replicas", time.monotonic() - since)
            else:
                came.pop("replicas", None)
            if len(came) < 3:
                time.sleep(0.3)
        detail = ", ".join(
            f"{what} {came[what]:.1f} s" if what in came else f"no {what}"
            for what in ("job", "chat", "replicas")
        )
        return (max(came.values()) if len(came) == 3 else None), detail

    def wait_job(self, job_id: str, deadline: float) -> str:
        while time.monotonic() < deadline:
            try:
                r = self.http.get(f"{self.url}/v1/jobs/{job_id}", headers=self.headers())
                if r.status_code == 200 and (state := r.json()["state"]) in TERMINAL:
                    return str(state)
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        return "unfinished"

    def settle(self, load: Load, bound_s: float = SETTLE_S) -> dict[str, str]:
        """Every accepted job's end state (or where it got stuck), waiting up to ``bound_s``."""
        deadline = time.monotonic() + bound_s
        return {job_id: self.wait_job(job_id, deadline) for job_id in load.jobs}

    def audit(self, job_ids: list[str]) -> tuple[int, list[str]]:
        """Retries counted, and what is wrong in the store: a task's attempts that ran at
        once (from the task logs and the operator's own ticks), a gap in a job's or task's
        history of events."""
        assert self.db is not None
        problems: list[str] = []
        with self.db.transaction() as s:
            tasks = s.execute(select(Task).where(Task.job_id.in_(job_ids))).scalars().all()
            logs = s.execute(select(TaskLog).where(TaskLog.job_id.in_(job_ids))).scalars().all()
            events = (
                s.execute(select(Event).where(Event.job_id.in_(job_ids)).order_by(Event.id))
                .scalars()
                .all()
            )
            jobs = {j.id: j for j in s.execute(select(Job).where(Job.id.in_(job_ids))).scalars()}
            retried = sum(max(t.attempt - 1, 0) for t in tasks)
            by_task: dict[str, list[TaskLog]] = {}
            for log in logs:
                by_task.setdefault(log.task_id, []).append(log)
            for task_id, runs in by_task.items():
                runs.sort(key=lambda r: r.started_at)
                for a, b in itertools.pairwise(runs):
                    if b.started_at < a.finished_at:
                        problems.append(f"{task_id}: attempts {a.attempt}, {b.attempt} at once")
            current = {j.id: j.state.value for j in jobs.values()} | {
                t.id: t.state.value for t in tasks
            }
            chains: dict[str, list[Event]] = {}
            for e in events:
                chains.setdefault(e.entity_id, []).append(e)
            for entity, chain in chains.items():
                for a, b in itertools.pairwise(chain):
                    if b.from_state != a.to_state:
                        gap = f"{a.to_state} then {b.from_state}->{b.to_state}"
                        problems.append(f"{entity}: events {gap}")
                if entity in current and chain[-1].to_state != current[entity]:
                    last = chain[-1].to_state
                    problems.append(f"{entity}: last event {last}, state {current[entity]}")
        problems += self._tick_overlaps()
        return retried, problems

    def _tick_overlaps(self) -> list[str]:
        """Each tick file is one task's: its attempts (one pid each) must not interleave."""
        problems = []
        for path in (self.root / "ticks").glob("*"):
            spans: dict[str, list[float]] = {}
            order: list[str] = []
            for line in path.read_text().splitlines():
                pid, _, at = line.partition(" ")
                try:
                    t = float(at)
                except ValueError:
                    continue  # a line cut by a kill
                if pid not in spans:
                    spans[pid] = [t, t]
                    order.append(pid)
                spans[pid][1] = t
            for a, b in itertools.pairwise(order):
                if spans[b][0] < spans[a][1]:
                    problems.append(f"{path.name}: attempts in {a} and {b} ran at once")
        return problems

    def round(
        self,
        fault: str,
        inject: Inject,
        before_s: float,
        after_s: float,
        recovery_s: float = RECOVERY_S,
        settle_s: float = SETTLE_S,
    ) -> Row:
        """Load for ``before_s``, the fault, load for ``after_s`` (then the fault is healed,
        if it is one that lasts), and the checks, waiting at most ``recovery_s`` for the
        platform to serve again and ``settle_s`` more for the accepted jobs to end."""
        with self.load() as load:
            time.sleep(before_s)
            injected = time.monotonic()
            heal = inject(self, load)
            time.sleep(after_s)
            if heal is not None:
                heal()
        drained = time.monotonic() - injected  # the load's requests in flight have ended
        recovery, recovered = self.recover(injected, recovery_s)
        recovered = f"load drained {drained:.1f} s, {recovered}"
        states = self.settle(load, settle_s)
        retried, problems = self.audit(load.jobs)
        if recovery is None:
            problems.append(f"not recovered within {recovery_s:.0f} s: {recovered}")
        unfinished = [j for j, s in states.items() if s not in TERMINAL]
        if unfinished:
            problems.append(f"{len(unfinished)} accepted jobs never ended: {unfinished[:5]}")
        if not self.deployment_ready():
            problems.append(f"the deployment did not return to its replicas: {self.deployment()}")
        problems += [f"lost: {d}" for d in load.lost_examples]
        return Row(
            fault=fault,
            jobs_accepted=len(load.jobs),
            jobs_finished=len(load.jobs) - len(unfinished),
            jobs_failed=sum(s == "failed" for s in states.values()),
            tasks_retried=retried,
            chats_ok=load.chats["ok"],
            requests_failed_cleanly=load.chats["failed"] + load.job_refusals,
            requests_lost=load.chats["lost"],
            recovery_s=recovery,
            recovered=recovered,
            problems=problems,
        )

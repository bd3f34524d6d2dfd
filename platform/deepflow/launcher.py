"""``deepflow up``: the whole platform on one machine, on the embedded defaults.

``Stack`` starts the parts as child processes: a Prefect server (``prefect server start``,
telemetry off, on a database of its own beside ours: ``prefect_database``), the Prefect
runner that serves our job-kind deployments, and Celery workers on the configured broker
(kombu's filesystem transport by default). ``up`` adds the API with the lease reconciler and
job dispatcher in its own process, prints the URLs, an API key and each part's health, and
stops everything on Ctrl-C. Each child's output goes to ``DEEPFLOW_HOME/logs/<part>.log``.
Integration tests and benchmarks use the same ``Stack``. What ``up`` takes (its home, its
ports) is checked as its own (``claims``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from deepflow import quickstart
from deepflow.api import create_app
from deepflow.api_client import remove_up, write_up
from deepflow.claims import (
    API_PORT_SETTING,
    DEFAULT_PREFECT_PORT,
    PREFECT_PORT_SETTING,
    PortTaken,
    claim_home,
    claim_port,
    claim_prefect_port,
    listens_in_session,
    port_in_use,
)
from deepflow.config import Settings
from deepflow.dispatch import Dispatcher, deployment_name
from deepflow.prefect_database import ensure_prefect_database, prefect_database_url
from deepflow.procutil import die_with_parent, freeze_heap
from deepflow.replicas.supervisor import Supervisor, stop_local_instances
from deepflow.store import (
    Database,
    Reconciler,
    authenticate,
    create_api_key,
    get_database,
    schema,
)

DEFAULT_TENANT = "default"
PREFECT_START_TIMEOUT_S = 120.0
PREFECT_HOST = "127.0.0.1"
PREFECT_SERVER_BATCHING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
}
"""The Prefect server writes task-run states and events in batches, flushed at least once a
second: by default it wrote each task-run event alone (batches of 1) and events 20 at a time,
and every attempt of every job sends three. On SQLite (the embedded default) that many small
write transactions starved its API: with a 5,000-task job running, a new job's flow run was
not created for minutes (``tests/integration/test_fairness.py``). A setting already in the
environment wins."""


class SchemaNotCurrent(RuntimeError):
    pass


def require_current_schema(database_url: str) -> None:
    """Refuse to serve a database that is not at the newest revision."""
    script = ScriptDirectory.from_config(schema.alembic_config(database_url))
    with get_database(database_url).engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current != script.get_current_head():
        raise SchemaNotCurrent(
            f"the database is at revision {current or 'empty'}, not "
            f"{script.get_current_head()}: run 'deepflow db upgrade'"
        )


def ensure_local_key(settings: Settings) -> str:
    """The key ``up`` prints: kept in DEEPFLOW_HOME/api_key, made on first start."""
    path = settings.ensure_home() / "api_key"
    db = get_database(settings.database_url)
    if path.exists():
        key = path.read_text().strip()
        with db.transaction() as session:
            if authenticate(session, key) is not None:
                return key
    with db.transaction() as session:
        _, key = create_api_key(session, DEFAULT_TENANT)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


@dataclass
class Part:
    """A child process of the stack."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> Part:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `up` alone; it stops the parts in order
                preexec_fn=_stop_with_parent,  # ... and a killed `up` leaves no orphans
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the part and everything it started (a crash, not a shutdown)."""
        if self.proc is not None and self.alive:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting."""
        if self.proc is not None and self.alive:
            self.proc.terminate()

    def stop(self, grace_s: float = 15.0) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()


def _stop_with_parent() -> None:
    die_with_parent(signal.SIGTERM)


def wait_healthy(
    url: str, part: Part | None, timeout_s: float, ours: Callable[[], bool] | None = None
) -> None:
    """Wait for ``url`` to answer 200 (and, with ``ours``, for the answer to be our part's)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if part is not None and not part.alive:
            raise RuntimeError(f"{part.name} exited while starting; see {part.log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200 and (ours is None or ours()):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s")


def _deepflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepflow.cli", *args]


class Stack:
    """The platform's processes for one Settings; every child gets the same environment."""

    def __init__(self, settings: Settings, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.logs = settings.ensure_home() / "logs"
        self.parts: list[Part] = []
        self.extra_env = extra_env or {}
        self.stopping = False
        self._lock = threading.Lock()  # a revival and ``stop`` never interleave

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            # A flow run starts when its Scheduled event wakes the worker; the worker's own
            # poll (10 s by default) is the fallback for a lost event.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            **self.settings.to_env(),
            **self.extra_env,
        }
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        if self.settings.prefect_api_url:
            env["PREFECT_API_URL"] = self.settings.prefect_api_url
        return env

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Part:
        log = self.logs / f"{name.replace(' ', '-')}.log"
        part = Part(name, argv, log).start(env or self.env())
        self.parts.append(part)
        return part

    def start_prefect_server(self, held: socket.socket | None = None) -> str:
        """Start a Prefect server on the port ``held`` (else on one ``claim_prefect_port``
        takes now); returns its API URL (also adopted by this stack's settings, so later
        parts talk to it). It is healthy once its /health answers from our part's socket."""
        held = held or claim_prefect_port(PREFECT_HOST, self.settings.prefect_port)
        port = int(held.getsockname()[1])
        home = self.settings.home / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        url = f"http://{PREFECT_HOST}:{port}/api"
        database = prefect_database_url(
            self.settings.database_url, self.settings.home, self.settings.prefect_database_url
        )
        ensure_prefect_database(database)
        env = {
            "PREFECT_API_DATABASE_CONNECTION_URL": database,
            **self.env(),  # extra_env may name another database (postgresql+asyncpg://...)
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": url,
        }
        env = {**PREFECT_SERVER_BATCHING, **env}
        prefect = str(Path(sys.executable).with_name("prefect"))
        argv = [prefect, "server", "start", "--host", PREFECT_HOST, "--port", str(port)]
        # Prefect takes a port, not a socket: from this close until it listens (its imports,
        # seconds) another process may take the port. Then our part exits on its bind and the
        # other may answer /health, so an answer counts only from a socket our part holds.
        # Without /proc (not Linux) that check cannot tell and the answer counts as ours.
        held.close()
        part = self._start("prefect server", argv, env)
        assert part.proc is not None
        session = part.proc.pid  # the part leads its own session (start_new_session)
        try:
            wait_healthy(
                f"{url}/health",
                part,
                PREFECT_START_TIMEOUT_S,
                ours=lambda: listens_in_session(session, port) is not False,
            )
        except RuntimeError:
            if part.alive or not port_in_use(PREFECT_HOST, port):
                raise
            raise PortTaken(
                f"port {port} (for the Prefect server) was taken by another process while it "
                f"started: start again, or choose a free one with {PREFECT_PORT_SETTING}"
            ) from None
        self.settings = dataclasses.replace(self.settings, prefect_api_url=url, prefect_port=port)
        return url

    def start_prefect_worker(self, timeout_s: float = 120.0) -> Part:
        """Start the Prefect worker and wait until it has applied our deployments."""
        part = self._start("prefect worker", _deepflow("prefect-worker"))
        url = f"{self.settings.prefect_api_url}/deployments/name/{deployment_name('dag')}"
        wait_healthy(url, part, timeout_s)
        return part

    def start_worker(self, queues: str = "cpu", concurrency: int | None = None) -> Part:
        argv = _deepflow("worker", "--queues", queues)
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        n = sum(p.name.startswith(f"{queues} worker") for p in self.parts)
        return self._start(f"{queues} worker {n}", argv)

    def revive(self, part: Part) -> Part:
        """Start a part that exited again, in its place, as a process supervisor would (the
        Prefect server on its port, so the others find it where they left it). A killed
        worker's attempts are redone through their expired leases; nothing else is lost."""
        with self._lock:
            if self.stopping:
                return part
            if part.name == "prefect server":
                port = self.settings.prefect_port
                assert port is not None
                held = claim_port(
                    PREFECT_HOST, port, PREFECT_PORT_SETTING, "for the Prefect server"
                )
                self.parts.remove(part)  # a failed start leaves the new part, to revive again
                self.start_prefect_server(held)
                return self.parts[-1]
            fresh = Part(part.name, part.argv, part.log).start(self.env())
            self.parts[self.parts.index(part)] = fresh
            return fresh

    def stop(self) -> None:
        """The workers together (each may wait out its running work, up to its grace), then
        the Prefect server they report to."""
        with self._lock:
            self.stopping = True
        servers = [p for p in self.parts if p.name == "prefect server"]
        workers = [p for p in reversed(self.parts) if p not in servers]
        for part in workers:
            part.terminate()
        for part in workers + servers:
            part.stop()


def platform_reconciler(
    settings: Settings, db: Database, dispatcher: Dispatcher | None = None
) -> Reconciler:
    """The reconciler with its passes: expired leases, jobs whose flow run could not be
    created when they were accepted or whose driver died (with Prefect configured), and the
    serving supervisor."""
    if dispatcher is None and settings.prefect_api_url:
        dispatcher = Dispatcher(db, settings.prefect_api_url)
    passes: list[Callable[[], object]] = []
    if dispatcher is not None:
        passes.append(dispatcher.dispatch_pending)
        passes.append(lambda: dispatcher.redrive_orphans(settings.driver_ttl_s))
    passes.append(Supervisor(db, dispatcher).pass_once)
    return Reconciler(db, settings.reconcile_interval_s, passes)


class ApiServer:
    """The API with its reconciler and dispatcher: ``run()`` in the foreground (``up``),
    or ``start()`` in a thread of this process (tests and benchmarks)."""

    def __init__(
        self,
        settings: Settings,
        db: Database | None = None,
        port: int | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        # It serves a socket bound here (or ``sock``, bound by the caller): the port is free
        # before and ours after, with no moment between for another process to take it.
        self.sock = sock or claim_port(settings.api_host, port or 0, API_PORT_SETTING, "the API's")
        self.db = db or get_database(settings.database_url)
        app = create_app(settings, self.db)
        self.reconciler = platform_reconciler(settings, self.db, app.state.dispatcher)
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://{settings.api_host}:{self.port}"
        config = uvicorn.Config(app, host=settings.api_host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve until Ctrl-C (or ``stop``), then stop the reconciler."""
        freeze_heap()  # this process is the API now: its imports are done
        self.reconciler.start()
        try:
            self.server.run(sockets=[self.sock])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it handled; stopping is the expected outcome
        finally:
            self.reconciler.stop()

    def start(self, timeout_s: float = 30.0) -> ApiServer:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def up(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    model: str | None = "smollm2",
) -> int:
    """The whole platform on this machine; with ``model`` (a ``quickstart.CHOICES`` key), it
    also deploys that quick-start model and prints how to call it."""
    settings = dataclasses.replace(
        settings, api_host=host or settings.api_host, api_port=port or settings.api_port
    )
    lock = claim_home(settings.home)  # first of all: a second `up` of this home touches nothing
    try:
        return _up(settings, model)
    finally:
        os.close(lock)


def _up(settings: Settings, model: str | None) -> int:
    # Both ports before anything starts or is written, so a taken one stops `up` at once.
    api_sock = claim_port(settings.api_host, settings.api_port, API_PORT_SETTING, "the API's")
    prefect_sock = None
    if not settings.prefect_api_url:
        prefect_sock = claim_prefect_port(PREFECT_HOST, settings.prefect_port)
        chosen = prefect_sock.getsockname()[1]
        if settings.prefect_port is None and chosen != DEFAULT_PREFECT_PORT:
            print(
                f"port {DEFAULT_PREFECT_PORT} is in use (another Prefect server?): using port "
                f"{chosen} for ours (DEEPFLOW_PREFECT_PORT sets one)",
                flush=True,
            )
    schema.upgrade(settings.database_url)
    key = ensure_local_key(settings)
    # SIGTERM stops everything as Ctrl-C does (uvicorn re-raises the signal it handled once
    # it has shut down; with the default handler the process would die before cleaning up).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    served = None
    if model:
        print("preparing the quick-start model ...", flush=True)
        served = quickstart.ensure_model(settings, DEFAULT_TENANT, model)
    stack = Stack(settings)
    try:
        if settings.prefect_api_url:
            wait_healthy(f"{settings.prefect_api_url}/health", None, 10)
        else:
            print(f"starting a Prefect server (log in {stack.logs}) ...", flush=True)
            stack.start_prefect_server(prefect_sock)
        stack.start_prefect_worker()
        stack.start_worker("cpu")
        return _serve_api(stack, api_sock, key, served)
    finally:
        remove_up(settings)
        db = get_database(stack.settings.database_url)
        stopped = stop_local_instances(db)
        stack.stop()
        # again: a deploy job still launching when the first sweep ran can have started one
        stopped += stop_local_instances(db)
        print(f"DeepFlow stopped ({stopped} engine instance(s) stopped).", flush=True)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve_api(stack: Stack, sock: socket.socket, key: str, model: str | None) -> int:
    os.environ.update(stack.env())  # the API's own Prefect client reads PREFECT_API_URL
    api = ApiServer(stack.settings, sock=sock)
    threading.Thread(target=_report, args=(stack, api, key, model), daemon=True).start()
    api.run()
    return 0


def _serve_model(url: str, key: str, model: str) -> None:
    print(f"deploying {model} (a deploy job launches its engine daemon) ...", flush=True)
    try:
        deployment = quickstart.deploy(url, key, model)
    except Exception as exc:
        print(f"!! could not serve {model}: {exc}", flush=True)
        return
    print(f"Serving {model} (deployment {deployment['id']}). Try:", flush=True)
    for line in quickstart.usage_lines(url, key, model):
        print(f"  {line}", flush=True)


def _report(stack: Stack, api: ApiServer, key: str, model: str | None) -> None:
    """Print the banner once the API answers, then say when a part dies."""
    server, reconciler = api.server, api.reconciler
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if not server.started:
        return
    settings = stack.settings
    url = f"http://{settings.api_host}:{settings.api_port}"
    # before the banner, which tells people to run `deepflow status` (it reads this file)
    write_up(
        settings,
        {
            "url": url,
            "pid": os.getpid(),
            "prefect_api_url": settings.prefect_api_url,
            "parts": {p.name: p.proc.pid for p in stack.parts if p.proc is not None},
        },
    )
    print(f"DeepFlow is up (data in {settings.home})")
    print(f"  API          {url}   (OpenAPI: {url}/openapi.json, docs: {url}/docs)")
    print(f"  Prefect UI   {(settings.prefect_api_url or '').removesuffix('/api')}")
    print(f"  API key      {key}")
    health = {"api": True, "lease reconciler": reconciler.healthy}
    health |= {p.name: p.alive for p in stack.parts}
    for name, ok in health.items():
        print(f"  {name:<16} {'healthy' if ok else 'NOT RUNNING'}")
    print(f"  try          curl -s -H 'Authorization: Bearer {key}' {url}/v1/jobs")
    print("               deepflow jobs · deepflow status · deepflow down")
    print("Ctrl-C (or `deepflow down`) stops everything.", flush=True)
    if model:
        threading.Thread(target=_serve_model, args=(url, key, model), daemon=True).start()
    _supervise(stack, lambda: bool(server.should_exit))


REVIVE_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits before starting a part that exited again: the n-th exit in a row waits the n-th
(the last thereafter). A part that stayed up for ``REVIVE_RESET_S`` starts the count anew."""
REVIVE_RESET_S = 60.0


def _supervise(stack: Stack, stopping: Callable[[], bool]) -> None:
    """Start every part that exits again, as systemd's ``Restart=always`` would, saying so."""
    exits: dict[str, int] = {}
    started: dict[str, float] = {p.name: time.monotonic() for p in stack.parts}
    while not stopping():
        for part in list(stack.parts):
            if part.alive or stopping():
                continue
            code = part.proc.returncode if part.proc is not None else None
            now = time.monotonic()
            if now - started.get(part.name, now) > REVIVE_RESET_S:
                exits[part.name] = 0
            n = exits.get(part.name, 0)
            wait_s = REVIVE_BACKOFF_S[min(n, len(REVIVE_BACKOFF_S) - 1)]
            exits[part.name] = n + 1
            print(
                f"!! {part.name} exited (code {code}); starting it again in {wait_s:.0f} s "
                f"(log: {part.log})",
                flush=True,
            )
            time.sleep(wait_s)
            try:
                stack.revive(part)
            except Exception as exc:  # it counts as one more exit; the next pass tries again
                print(f"!! {part.name} did not start: {exc}", flush=True)
            started[part.name] = time.monotonic()
        time.sleep(0.5)

"""Run Prefect 3 task runs on Celery workers: `CeleryTaskRunner`, its future, the worker task.

Flow side::

    app = Celery("deepflow", broker="redis://...", backend="redis://...")  # backend required

    @flow(task_runner=CeleryTaskRunner(app, default_queue="cpu"))
    def job():
        a = prepare.submit()                                   # queue "cpu"
        b = train.with_options(tags={"queue:cuda", "priority:7"}).submit(a)
        return b.result()

Worker side: the same app with ``register_task(app)`` called, and the flows' code importable.
Recommended app config: ``task_acks_late=True``, ``worker_prefetch_multiplier=1``,
``task_reject_on_worker_lost=True`` (a lost worker's run is redelivered under the same id;
without it the future settles Crashed) and a result backend (the final state comes back
through it). JSON-only apps work: the payload is base64 text. Each worker needs
``PREFECT_API_URL`` in its environment: the flow's Prefect settings are not shipped (API keys
stay out of the broker; a worker reaches the API at its own address). Celery task id = Prefect
task run id. ``revoke(terminate=True)`` needs the prefork (or solo) pool.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, cast

import celery
import cloudpickle
from celery import states as celery_states
from celery.backends.base import KeyValueStoreBackend
from celery.result import AsyncResult
from prefect.client.schemas.objects import StateDetails
from prefect.context import (
    FlowRunContext,
    SyncClientContext,
    TagsContext,
    TaskRunContext,
    hydrated_context,
    serialize_context,
)
from prefect.events.worker import EventsWorker
from prefect.exceptions import Abort, Pause
from prefect.futures import PrefectFuture, PrefectTaskRunFuture, resolve_futures_to_states
from prefect.settings import get_current_settings
from prefect.states import Cancelled, Crashed, Pending, State
from prefect.task_engine import run_task_async, run_task_sync
from prefect.task_runners import TaskRunner
from prefect.tasks import Task
from prefect.utilities.annotations import quote
from prefect.utilities.collections import StopVisiting, visit_collection
from prefect.utilities.engine import capture_sigterm

__all__ = ["TASK_NAME", "CeleryTaskRunner", "PrefectCeleryFuture", "register_task"]

R = TypeVar("R")
TASK_NAME = "prefect_celery.run_task"
# The result backend is polled, not subscribed to, so any backend works: fast at first so short
# tasks return promptly, then backing off so hundreds of long runs cost a few reads a second.
POLL_MIN_S = 0.05
POLL_MAX_S = 1.0
# Publisher threads only pickle and send (a task waiting on upstream runs holds no thread).
PUBLISH_THREADS = 4

logger = logging.getLogger("prefect_celery")
_registered: weakref.WeakKeyDictionary[celery.Celery, celery.Task] = weakref.WeakKeyDictionary()


def _dumps(obj: Any) -> str:
    return base64.b64encode(cloudpickle.dumps(obj)).decode("ascii")


def _loads(text: str) -> Any:
    return cloudpickle.loads(base64.b64decode(text))


# ---- worker side ----------------------------------------------------------------------------


def register_task(app: celery.Celery) -> celery.Task:
    """Define `prefect_celery.run_task` on `app` (once); workers must import a module calling it."""
    if app not in _registered:
        options = {"track_started": True, "resultrepr_maxsize": 80}  # STARTED: revoke needs it
        _registered[app] = app.task(name=TASK_NAME, shared=False, **options)(_run_task)
    return _registered[app]


def _run_task(payload: str) -> str:
    """Run one Prefect task run in this worker process; returns its final state, pickled.

    Not `handle_engine_signals`: its `exit()` on Abort would kill the pool child, which Celery
    would count as a lost worker and redeliver. SIGTERM (revoke with terminate) becomes
    Prefect's TerminationSignal, so the run is reported Crashed before the child dies.
    """
    if get_current_settings().api.url is None:
        raise RuntimeError("PREFECT_API_URL is not set on this Celery worker")
    call = _loads(payload)
    context = call.pop("context")
    client_context = _process_client_context()
    token = SyncClientContext.__var__.set(client_context)
    with capture_sigterm():
        try:
            with hydrated_context(context, client=client_context.client):
                if call["task"].isasync:
                    state = asyncio.run(run_task_async(**call, return_type="state"))
                else:
                    state = run_task_sync(**call, return_type="state")
        except (Abort, Pause) as exc:
            details = StateDetails(task_run_id=call["task_run_id"])
            state = Crashed(message=f"Prefect stopped the task run: {exc}", state_details=details)
        finally:  # task-run states travel as events: send them before reporting done
            try:
                EventsWorker.instance().wait_until_empty()
            except Exception:
                logger.warning("could not flush Prefect events", exc_info=True)
            SyncClientContext.__var__.reset(token)
    return _dumps(state)


_client_contexts: dict[int, SyncClientContext] = {}


def _process_client_context() -> SyncClientContext:
    """One open Prefect client per worker process, reused by every task run it executes.

    Without it, Prefect's engine opens a new client (and TLS context: ~40 ms of loading CA
    certificates) several times per task run, which dominated a noop task's cost."""
    pid = os.getpid()
    if pid not in _client_contexts:
        context = SyncClientContext()
        context.client.__enter__()
        _client_contexts.clear()  # a forked child must not reuse its parent's connection
        _client_contexts[pid] = context
    return _client_contexts[pid]


def _serialize_context() -> dict[str, Any]:
    context = serialize_context()
    context.pop("settings_context", None)
    return context


# ---- flow side: the future ------------------------------------------------------------------


class PrefectCeleryFuture(PrefectTaskRunFuture[R], Generic[R]):
    """A task run sent (or about to be sent) to Celery under its task run id.

    Settles once, with the Prefect state the worker returned, or with a Crashed state when the
    Celery task itself failed, or Cancelled when revoked: it never waits on nothing.
    """

    def __init__(self, task_run_id: uuid.UUID, app: celery.Celery) -> None:
        super().__init__(task_run_id)
        self._app = app
        self._lock = threading.RLock()  # re-entrant: done-callbacks run while it is held
        self._sent = False
        self._done: concurrent.futures.Future[State[R]] = concurrent.futures.Future()
        # First callback: `_final_state` is set before any waiter or user callback runs.
        self._done.add_done_callback(self._record_final_state)

    @property
    def state(self) -> State[R]:
        return self._final_state or Pending()

    @property
    def celery_result(self) -> AsyncResult:
        """Celery's view of the run (state, traceback); its id is the task run id."""
        return AsyncResult(str(self.task_run_id), app=self._app)

    def done(self) -> bool:
        return self._done.done()

    def wait(self, timeout: float | None = None) -> None:
        concurrent.futures.wait([self._done], timeout=timeout)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> R:
        self.wait(timeout)
        if self._final_state is None:
            raise TimeoutError(f"Task run {self.task_run_id} did not finish within {timeout} s")
        state = self._final_state  # `_sync`: never a coroutine, even inside an async flow
        return cast(R, state.result(raise_on_failure=raise_on_failure, _sync=True))  # type: ignore[call-overload]

    def add_done_callback(self, fn: Callable[[PrefectFuture[R]], None]) -> None:
        self._done.add_done_callback(lambda _: fn(self))

    def cancel(self) -> bool:
        return self.revoke()

    def revoke(self, terminate: bool = False) -> bool:
        """Revoke the Celery task; True if it will not run, or is being killed (`terminate`).

        A run not started yet settles Cancelled at once and is marked REVOKED in the result
        backend (a worker that receives it drops it). A running one runs on unless `terminate`:
        then its worker SIGTERMs the process (prefork/solo pool), Prefect records it Crashed and
        this future settles Cancelled.
        """
        with self._lock:
            if self._done.done():
                return False
            if not self._sent:
                self._settle(self._cancelled("cancelled before it was sent to Celery"))
                return True
        task_id = str(self.task_run_id)
        self._app.control.revoke(task_id, terminate=terminate, signal="SIGTERM")
        status = self.celery_result.state  # read after the broadcast: no worker starts it now
        if status == celery_states.PENDING:  # queued: settle now, even if no worker serves it
            self._app.backend.mark_as_revoked(task_id, reason="revoked before it started")
        elif status != celery_states.REVOKED:  # (a worker may have marked it already)
            # finished first (the watcher settles it), or running: only terminate stops it
            return terminate and status not in celery_states.READY_STATES
        self._settle(self._cancelled("revoked before it started"))  # whoever marked it
        return True

    def _publish(self, send: Callable[[], object]) -> bool:
        """Send unless cancelled meanwhile; the lock orders this against `revoke`."""
        with self._lock:
            if self._done.done():
                return False
            send()
            self._sent = True
            return True

    def _settle(self, state: State[Any]) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # first outcome wins
            self._done.set_result(state)

    def _crashed(self, message: str, exc: BaseException | None = None) -> State[Any]:
        details = StateDetails(task_run_id=self.task_run_id)
        return Crashed(message=message, data=exc, state_details=details)

    def _cancelled(self, message: str) -> State[Any]:
        return Cancelled(message=message, state_details=StateDetails(task_run_id=self.task_run_id))

    def _record_final_state(self, done: concurrent.futures.Future[State[R]]) -> None:
        self._final_state = done.result()

    def _state_from_meta(self, meta: dict[str, Any]) -> State[Any]:
        status: str | None = meta.get("status")
        value: Any = meta.get("result")
        if status == celery_states.SUCCESS:
            try:
                state = _loads(value)
            except Exception as exc:
                return self._crashed(f"Could not unpickle the task run's state: {exc!r}", exc)
            if isinstance(state, State):
                return state
            return self._crashed(f"Celery task returned {type(state).__name__}, not a State")
        if status == celery_states.REVOKED:
            return self._cancelled(f"Celery task revoked: {value}")
        error = value if isinstance(value, BaseException) else None
        return self._crashed(f"Celery task {status}: {value!r}", error)


# ---- flow side: the result watcher ----------------------------------------------------------


class _ResultWatcher:
    """One daemon thread polls the result backend for every sent task run, with backoff.

    The thread starts on the first watched future and ends when none is left, so a runner that
    is gone leaves nothing behind once its sent tasks finish.
    """

    def __init__(self, app: celery.Celery) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[str, PrefectCeleryFuture[Any]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, future: PrefectCeleryFuture[Any]) -> None:
        with self._lock:
            self._pending[str(future.task_run_id)] = future
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="prefect-celery-results", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        interval = POLL_MIN_S
        while True:
            self._wake.clear()
            with self._lock:
                self._pending = {k: f for k, f in self._pending.items() if not f.done()}
                pending = dict(self._pending)
                if not pending:
                    self._thread = None
                    return
            try:
                metas = self._fetch(list(pending))
                ready = [k for k, m in metas.items() if m["status"] in celery_states.READY_STATES]
                for key in ready:
                    pending[key]._settle(pending[key]._state_from_meta(metas[key]))
            except Exception:  # the backend is down: keep every future and try again
                logger.warning("reading Celery results failed; retrying", exc_info=True)
                ready = []
            interval = POLL_MIN_S if ready else min(interval * 2, POLL_MAX_S)
            if self._wake.wait(interval):  # a new run was sent: look soon
                interval = POLL_MIN_S

    def _fetch(self, task_ids: list[str]) -> dict[str, dict[str, Any]]:
        backend = self._app.backend  # this thread's own instance (Celery backends are per thread)
        if isinstance(backend, KeyValueStoreBackend):  # Redis, files and the like: one call
            with contextlib.suppress(NotImplementedError):
                values = backend.mget([backend.get_key_for_task(t) for t in task_ids])
                pairs = zip(task_ids, values, strict=True)
                return {t: backend.decode_result(v) for t, v in pairs if v is not None}
        return {t: backend.get_task_meta(t, cache=False) for t in task_ids}


# ---- flow side: the runner ------------------------------------------------------------------


class CeleryTaskRunner(TaskRunner[PrefectCeleryFuture[Any]]):
    """Sends each task run to a Celery queue; workers run it with Prefect's task engine.

    The queue is what `route(task, parameters)` returns if given (a module-level function, so
    the runner stays picklable), else the task's `queue:<name>` tag (task or `prefect.tags`
    context), else `default_queue`; a `priority:<0-9>` tag sets the message priority. Routing
    without tags matters for throughput: a task run with any tag makes Prefect's engine ask
    the API for tag concurrency slots, one round trip per run. The Celery task id is the
    Prefect task run id, so anyone can revoke a run by its id.
    """

    def __init__(
        self,
        app: celery.Celery,
        *,
        default_queue: str = "celery",
        queue_tag_prefix: str = "queue:",
        route: Callable[[Task[Any, Any], dict[str, Any]], str | None] | None = None,
    ) -> None:
        super().__init__()
        if not app.conf.result_backend:
            raise ValueError("CeleryTaskRunner needs a Celery app with a result backend")
        self._app = app
        self._default_queue = default_queue
        self._queue_tag_prefix = queue_tag_prefix
        self._route = route
        self._setup()

    def _setup(self) -> None:
        self._publisher: concurrent.futures.ThreadPoolExecutor | None = None
        self._watcher = _ResultWatcher(self._app)
        self._outstanding: dict[uuid.UUID, PrefectCeleryFuture[Any]] = {}
        self._outstanding_lock = threading.Lock()
        # Prefect's flow engine calls cancel_all() on the flow's runner, not on the duplicate it
        # entered, so cancelling reaches the duplicates through this set.
        self._duplicates: weakref.WeakSet[CeleryTaskRunner] = weakref.WeakSet()
        self._cached_context: tuple[Any, dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled with the flow into each payload: keep the config, not threads or locks."""
        keep = ("logger", "_started", "_app", "_default_queue", "_queue_tag_prefix", "_route")
        return {k: v for k, v in self.__dict__.items() if k in keep} | {"_started": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def duplicate(self) -> CeleryTaskRunner:
        twin = type(self)(
            self._app,
            default_queue=self._default_queue,
            queue_tag_prefix=self._queue_tag_prefix,
            route=self._route,
        )
        self._duplicates.add(twin)
        return twin

    def __enter__(self) -> CeleryTaskRunner:
        super().__enter__()
        self._publisher = concurrent.futures.ThreadPoolExecutor(
            PUBLISH_THREADS, thread_name_prefix="prefect-celery-publish"
        )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Revoke what has not started, as Prefect's own runners drop queued work at exit.

        Runs already running finish (they report to Prefect themselves) and stay watched.
        """
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.shutdown(wait=True)
        self._revoke_outstanding()
        super().__exit__(*exc_info)

    def cancel_all(self) -> None:
        """Revoke every unfinished run of this runner and its duplicates (running ones finish)."""
        for twin in list(self._duplicates):
            twin.cancel_all()
        self._revoke_outstanding()

    def _revoke_outstanding(self) -> None:
        with self._outstanding_lock:
            futures = list(self._outstanding.values())
        for future in futures:
            future.revoke()

    def submit(
        self,
        task: Task[Any, Any],
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
        dependencies: dict[str, set[Any]] | None = None,
    ) -> PrefectCeleryFuture[Any]:
        """Return at once; the run is sent when every future it depends on has finished."""
        if not self._started or self._publisher is None:
            raise RuntimeError("The task runner must be started before submitting work.")
        options = self._send_options(task)
        if self._route is not None and (queue := self._route(task, parameters)):
            options["queue"] = queue
        context = self._context()
        future: PrefectCeleryFuture[Any] = PrefectCeleryFuture(uuid.uuid4(), self._app)
        with self._outstanding_lock:
            self._outstanding[future.task_run_id] = future
        future.add_done_callback(self._forget)
        call: dict[str, Any] = {
            "task": task,
            "task_run_id": future.task_run_id,
            "parameters": parameters,
            "wait_for": list(wait_for or ()),
            "dependencies": dependencies,
            "context": context,
        }
        upstream = _futures_in(parameters) | set(call["wait_for"])
        _when_all_done(upstream, lambda: self._schedule(future, call, options))
        return future

    def _context(self) -> dict[str, Any]:
        """Prefect's context for the worker, without settings (the worker's own apply).

        Serialising it dumps every Prefect setting, milliseconds per call, so the context
        of submissions made straight from a flow run (no task run around them) is reused."""
        if TaskRunContext.get() is not None:
            return _serialize_context()
        flow_run = FlowRunContext.get()
        key = flow_run.flow_run.id if flow_run and flow_run.flow_run else None
        if self._cached_context is None or self._cached_context[0] != key:
            self._cached_context = (key, _serialize_context())
        return self._cached_context[1]

    def _forget(self, future: PrefectFuture[Any]) -> None:
        with self._outstanding_lock:
            self._outstanding.pop(cast(PrefectCeleryFuture[Any], future).task_run_id, None)

    def _send_options(self, task: Task[Any, Any]) -> dict[str, Any]:
        tags = set(task.tags) | set(TagsContext.get().current_tags)
        prefix = self._queue_tag_prefix
        queues = sorted(t.removeprefix(prefix) for t in tags if t.startswith(prefix))
        if len(queues) > 1:
            raise ValueError(f"Task {task.name!r} has several queue tags: {queues}")
        options: dict[str, Any] = {"queue": queues[0] if queues else self._default_queue}
        for tag in tags:
            if tag.startswith("priority:"):
                value = tag.removeprefix("priority:")
                if not (value.isdigit() and 0 <= int(value) <= 9):
                    raise ValueError(f"Task {task.name!r}: priority tag must be 0-9, got {tag!r}")
                options["priority"] = int(value)
        return options

    def _schedule(
        self, future: PrefectCeleryFuture[Any], call: dict[str, Any], options: dict[str, Any]
    ) -> None:
        publisher = self._publisher
        try:
            if publisher is None:
                raise RuntimeError("task runner closed")
            publisher.submit(self._publish, future, call, options)
        except RuntimeError:
            future._settle(future._cancelled("task runner closed before its upstream runs ended"))

    def _publish(
        self, future: PrefectCeleryFuture[Any], call: dict[str, Any], options: dict[str, Any]
    ) -> None:
        """Swap finished futures for their states (the worker's engine resolves them), send."""
        task: Task[Any, Any] = call["task"]
        try:
            call["parameters"] = resolve_futures_to_states(call["parameters"])
            call["wait_for"] = resolve_futures_to_states(call["wait_for"]) or None
            payload = _dumps(call)

            def send() -> None:
                self._app.send_task(
                    TASK_NAME,
                    args=(payload,),
                    task_id=str(future.task_run_id),
                    shadow=task.name,
                    argsrepr=f"({task.name!r}, {future.task_run_id})",
                    add_to_parent=False,
                    **options,
                )

            if future._publish(send):
                self._watcher.watch(future)
        except Exception as exc:
            future._settle(future._crashed(f"Could not send the task run to Celery: {exc!r}", exc))


def _futures_in(parameters: dict[str, Any]) -> set[PrefectFuture[Any]]:
    """Futures anywhere in the parameters, except under `quote` (Prefect leaves those alone)."""
    found: set[PrefectFuture[Any]] = set()

    def visit(expr: Any, context: dict[str, Any]) -> Any:
        if isinstance(context.get("annotation"), quote):
            raise StopVisiting()
        if isinstance(expr, PrefectFuture):
            found.add(expr)
        return expr

    visit_collection(parameters, visit_fn=visit, return_data=False, context={})
    return found


def _when_all_done(futures: set[PrefectFuture[Any]], then: Callable[[], None]) -> None:
    """Call `then` once every future is done, from the thread that finishes the last one."""
    if not futures:
        then()
        return
    remaining = len(futures)
    lock = threading.Lock()

    def one_done(_: PrefectFuture[Any]) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            then()

    for future in futures:
        future.add_done_callback(one_done)

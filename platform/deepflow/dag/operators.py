"""The operator registry: what a task can do, by name.

A task names an operator and gives it ``args`` (small JSON); a worker looks the operator up
here and calls it. ``check`` runs at submission, so a bad argument is a 4xx before anything
is stored. The built-ins here exercise every scheduling path.

Every other operator comes from a plugin: a distribution lists it under the
``deepflow.operators`` entry-point group, naming a module with an ``OPERATORS`` sequence or
a callable that returns operators. The registry loads every plugin the first time it is
asked about an operator, so what a process can run does not depend on what it happened to
import. The platform's own serving operators are a plugin like any other, listed in our
``pyproject.toml`` (``deploy = "deepflow.replicas.operators"``). ``load_plugins`` loads them
eagerly at start-up and also imports the modules named in ``DEEPFLOW_OPERATORS``: a
development override for operators that are not installed (tests, a work in progress).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, distributions
from types import ModuleType
from typing import Any

JSON = Any
ENTRY_POINT_GROUP = "deepflow.operators"

log = logging.getLogger(__name__)


class OperatorFailed(RuntimeError):
    """Raised by an operator whose work failed; the task fails (or retries)."""


def _no_check(args: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    run: Callable[[dict[str, Any]], JSON] | None
    """None for an operator a job kind's shape names but whose implementation has not been
    registered in this process; a task naming it fails with a message saying so."""
    check: Callable[[dict[str, Any]], None] = _no_check
    description: str = ""
    takes_context: bool = False
    """Its args get ``context``: the job's id and tenant, the task's name, and the outputs
    of the tasks it depends on (by name), as Airflow's XCom would hand them over."""
    internal: bool = False
    """Run only in the platform's own jobs (a deploy job's launches and stops): a job a user
    submits may not name it, since its args (an instance's or a deployment's id) are trusted,
    not checked against the submitting tenant."""


class Registry:
    """Operators by name, completed from the entry-point ``group`` on first use (None: no
    plugins, for tests). Thread-safe: a second thread asking while the first loads waits."""

    def __init__(self, group: str | None = ENTRY_POINT_GROUP) -> None:
        self._operators: dict[str, Operator] = {}
        self._group = group
        self._lock = threading.RLock()
        self._loading = False
        self._loaded = group is None
        self.broken: dict[str, str] = {}
        """Plugins that failed to load: ``name = value`` of the entry point -> the error."""

    def register(self, op: Operator) -> Operator:
        """Add an operator; an implementation may replace a declared (``run=None``) one."""
        with self._lock:
            known = self._operators.get(op.name)
            if known is not None and known is not op and known.run is not None:
                raise ValueError(f"operator {op.name!r} is already registered")
            self._operators[op.name] = op
        return op

    def declare(self, name: str, description: str) -> Operator:
        """Name an operator that a job kind's DAG uses before its implementation is loaded."""
        with self._lock:
            if name in self._operators:
                return self._operators[name]
            return self.register(Operator(name, None, description=description))

    def get(self, name: str) -> Operator:
        self.load_entry_points()
        try:
            return self._operators[name]
        except KeyError:
            raise KeyError(f"unknown operator {name!r}{self._broken_note()}") from None

    def is_registered(self, name: str) -> bool:
        self.load_entry_points()
        return name in self._operators

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(self._operators)

    def run(self, name: str, args: dict[str, Any]) -> JSON:
        op = self.get(name)
        if op.run is None:
            raise OperatorFailed(
                f"operator {name!r} has no implementation in this process{self._broken_note()}"
            )
        return op.run(args)

    def load_entry_points(self) -> None:
        """Load every plugin of the group, once. A plugin that fails is logged and listed in
        ``broken`` (and in the error of a task that needed it); the others still load."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:  # loading: a plugin asked while it is imported
                return
            self._loading = True
            try:
                for ep in _entry_points(self._group or ""):
                    self._load_entry_point(ep)
            finally:
                self._loading = False
                self._loaded = True

    def load_modules(self, modules: Iterable[str]) -> None:
        """Import operator modules by name (the development override): each one's
        ``OPERATORS`` is registered; a module without it registers its own on import."""
        for name in modules:
            module = importlib.import_module(name)
            if hasattr(module, "OPERATORS"):
                self._add(name, module)

    def _load_entry_point(self, ep: EntryPoint) -> None:
        source = f"{ep.name} = {ep.value}"
        try:
            self._add(source, ep.load())
        except Exception as exc:  # one broken plugin must not hide the others
            log.exception("operator plugin %s failed to load", source)
            self.broken[source] = f"{type(exc).__name__}: {exc}"

    def _add(self, source: str, target: object) -> None:
        if isinstance(target, ModuleType):
            found = getattr(target, "OPERATORS", None)
            if found is None:
                raise TypeError(f"operator plugin {source}: the module has no OPERATORS")
        elif callable(target):
            found = target()
        else:
            raise TypeError(f"operator plugin {source} names neither a module nor a callable")
        for op in found:
            if not isinstance(op, Operator):
                raise TypeError(f"operator plugin {source} gave {op!r}, not an Operator")
            self.register(op)

    def _broken_note(self) -> str:
        if not self.broken:
            return ""
        failures = "; ".join(f"{source}: {error}" for source, error in sorted(self.broken.items()))
        return f" (operator plugins that failed to load: {failures})"


def _entry_points(group: str) -> list[EntryPoint]:
    """Every distribution's entry points in ``group``, once each. Not ``entry_points()``,
    which reads only the first distribution of each name on sys.path: a stale ``*.egg-info``
    left in a source folder (the repository root is on sys.path in tests and workers) would
    hide the installed metadata, and with it the platform's own operators."""
    found: dict[tuple[str, str], EntryPoint] = {}
    for dist in distributions():
        for ep in dist.entry_points.select(group=group):
            found.setdefault((ep.name, ep.value), ep)
    return list(found.values())


REGISTRY = Registry()
"""This process's operators; the functions below are its interface."""


def register(op: Operator) -> Operator:
    """Add an operator; an implementation may replace a declared (``run=None``) one."""
    return REGISTRY.register(op)


def declare(name: str, description: str) -> Operator:
    """Name an operator that a job kind's DAG uses before its implementation is loaded."""
    return REGISTRY.declare(name, description)


def run(name: str, args: dict[str, Any]) -> JSON:
    """Run operator ``name``; the one entry point workers use."""
    return REGISTRY.run(name, args)


def get(name: str) -> Operator:
    return REGISTRY.get(name)


def is_registered(name: str) -> bool:
    return REGISTRY.is_registered(name)


def names() -> list[str]:
    return REGISTRY.names()


def load_plugins(modules: str | None = None) -> None:
    """Load the installed plugins now (not on first use), then the modules named in a
    comma-separated list (``DEEPFLOW_OPERATORS``). The API and every worker call it at
    start-up with the same list."""
    REGISTRY.load_entry_points()
    REGISTRY.load_modules(filter(None, (m.strip() for m in (modules or "").split(","))))


def _check_sleep(args: dict[str, Any]) -> None:
    seconds = args.get("seconds", 1.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError("sleep needs args.seconds as a number")
    if not 0 <= seconds <= 86400:
        raise ValueError("sleep's args.seconds must be between 0 and 86400")
    if set(args) - {"seconds"}:
        raise ValueError(f"sleep takes only 'seconds', not {sorted(set(args) - {'seconds'})}")


def _sleep(args: dict[str, Any]) -> JSON:
    seconds = float(args.get("seconds", 1.0))
    time.sleep(seconds)  # a cancelled attempt's process is killed, sleeping or not
    return {"slept_s": seconds}


def _fail(args: dict[str, Any]) -> JSON:
    raise OperatorFailed(str(args.get("message", "the fail operator always fails")))


register(Operator("noop", lambda args: None, description="Does nothing and succeeds."))
register(Operator("sleep", _sleep, _check_sleep, "Sleeps args.seconds, then succeeds."))
register(Operator("fail", _fail, description="Always raises (args.message)."))
register(Operator("echo", lambda args: args, description="Returns its args as its output."))

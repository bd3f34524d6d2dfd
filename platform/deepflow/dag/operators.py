"""The operator registry: what a task can do, by name.

A task names an operator and gives it ``args`` (small JSON); a worker looks the operator up
here and calls it. ``check`` runs at submission, so a bad argument is a 4xx before anything
is stored. The built-ins here exercise every scheduling path; serving, fine-tuning and batch
operators register themselves from their own modules.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

JSON = Any


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


_REGISTRY: dict[str, Operator] = {}


def register(op: Operator) -> Operator:
    """Add an operator; an implementation may replace a declared (``run=None``) one."""
    known = _REGISTRY.get(op.name)
    if known is not None and known is not op and known.run is not None:
        raise ValueError(f"operator {op.name!r} is already registered")
    _REGISTRY[op.name] = op
    return op


def declare(name: str, description: str) -> Operator:
    """Name an operator that a job kind's DAG uses before its implementation is loaded."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    return register(Operator(name, None, description=description))


def run(name: str, args: dict[str, Any]) -> JSON:
    """Run operator ``name``; the one entry point workers use."""
    op = get(name)
    if op.run is None:
        raise OperatorFailed(f"operator {name!r} has no implementation in this process")
    return op.run(args)


def get(name: str) -> Operator:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown operator {name!r}") from None


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def names() -> list[str]:
    return sorted(_REGISTRY)


BUILTIN_PLUGINS = ("deepflow.replicas.operators",)
"""The platform's own operator modules (serving), loaded with any the settings name."""


def load_plugins(modules: str | None) -> None:
    """Import operator modules named in a comma-separated list (``DEEPFLOW_OPERATORS``);
    each registers its operators on import. The API and every worker load the same list."""
    named = filter(None, (m.strip() for m in (modules or "").split(",")))
    for name in (*BUILTIN_PLUGINS, *named):
        importlib.import_module(name)


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
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))  # short naps: a cancelled attempt stops promptly
    return {"slept_s": seconds}


def _fail(args: dict[str, Any]) -> JSON:
    raise OperatorFailed(str(args.get("message", "the fail operator always fails")))


register(Operator("noop", lambda args: None, description="Does nothing and succeeds."))
register(Operator("sleep", _sleep, _check_sleep, "Sleeps args.seconds, then succeeds."))
register(Operator("fail", _fail, description="Always raises (args.message)."))
register(Operator("echo", lambda args: args, description="Returns its args as its output."))

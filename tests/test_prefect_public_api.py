"""No module of the project uses a name of Prefect's that begins with an underscore.

Prefect moves its private modules and methods between releases without notice (twice in
2026); we extend it only through public names (``docs/prefect-worker.md``). Checked from the
source: imports of ``prefect._x`` or ``from prefect.x import _y``, attributes beginning with
``_`` reached from a Prefect name (``prefect._internal``, ``Runner._poll``), and, in modules
that import Prefect, any ``obj._name`` or ``getattr(obj, "_name")`` whose name the project
does not define itself (a Prefect object's private attribute, such as a worker's inherited
``self._propose_crashed_state``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("platform", "flows", "workers", "migrations", "tests", "bench")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _files() -> list[Path]:
    return [p for top in SOURCES for p in sorted((REPO / top).rglob("*.py"))]


def defined_names(trees: Iterable[ast.AST]) -> set[str]:
    """Every private name the project defines: functions, classes, attributes it assigns,
    parameters and module or class variables."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
    return {n for n in names if _private(n)}


def _from_prefect(module: str | None) -> bool:
    return module is not None and (module == "prefect" or module.startswith("prefect."))


def _import_violations(
    tree: ast.AST, prefect_names: set[str], other_modules: set[str]
) -> Iterator[tuple[int, str]]:
    """Private names in imports; fills in which local names are Prefect's and which are
    other modules' (``os`` in ``os._exit`` is not Prefect's)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = (alias.asname or alias.name).split(".")[0]
                if not _from_prefect(alias.name):
                    other_modules.add(local)
                    continue
                prefect_names.add(local)
                if any(_private(part) for part in alias.name.split(".")):
                    yield node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.module and _from_prefect(node.module):
            if any(_private(part) for part in node.module.split(".")):
                yield node.lineno, f"from {node.module} import ..."
            for alias in node.names:
                prefect_names.add(alias.asname or alias.name)
                if _private(alias.name):
                    yield node.lineno, f"from {node.module} import {alias.name}"


def _private_getattr(node: ast.AST, ours: set[str]) -> str | None:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return None
    if node.func.id not in {"getattr", "setattr", "hasattr", "delattr"} or len(node.args) < 2:
        return None
    name = node.args[1]
    value = name.value if isinstance(name, ast.Constant) else None
    if isinstance(value, str) and _private(value) and value not in ours:
        return f"{node.func.id}(..., {value!r})"
    return None


def violations(tree: ast.AST, ours: set[str]) -> Iterator[tuple[int, str]]:
    """(line, what) for each use of a private Prefect name in ``tree``."""
    prefect_names: set[str] = set()
    other_modules: set[str] = set()
    yield from _import_violations(tree, prefect_names, other_modules)
    if not prefect_names:
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            root_name = root.id if isinstance(root, ast.Name) else None
            if root_name in prefect_names:
                yield node.lineno, f"{root_name}....{node.attr}"
            elif node.attr not in ours and root_name not in other_modules:
                yield node.lineno, f"{node.attr} (not defined by the project)"
        elif (what := _private_getattr(node, ours)) is not None:
            yield getattr(node, "lineno", 0), what


def test_no_module_uses_a_private_prefect_name() -> None:
    trees = {path: ast.parse(path.read_text(), str(path)) for path in _files()}
    ours = defined_names(trees.values())
    found = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for path, tree in trees.items()
        if path.name != Path(__file__).name
        for line, what in violations(tree, ours)
    ]
    assert not found, "private Prefect names in use:\n" + "\n".join(found)


def test_the_check_finds_what_the_old_runner_hooks_did() -> None:
    """What flows/warm_pool.py and flows/wakeup.py used before the worker: each is found."""
    source = """
from prefect._internal.control_listener import configure_from_env
from prefect.runner import _starter_direct, Runner
import prefect.runner._starter_engine
from prefect.workers.base import BaseWorker

class W(BaseWorker):
    async def run(self, flow_run):
        await self._propose_crashed_state(flow_run, "x")

def hook(runner):
    runner._deployment_registry.get_deployment_ids()
    Runner._get_and_submit_flow_runs
    getattr(runner, "_limiter")
"""
    tree = ast.parse(source)
    found = [what for _, what in violations(tree, defined_names([tree]))]
    assert len(found) == 7, found
    # A private name the project defines itself is not Prefect's.
    mine = ast.parse("import prefect\nclass F:\n    def _settle(self): ...\nF()._settle()\n")
    assert list(violations(mine, defined_names([mine]))) == []

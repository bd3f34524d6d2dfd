"""A validated task DAG: names unique, dependencies known, no cycles, operators registered."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from deepflow.dag import operators
from deepflow.dag.errors import DagError
from deepflow.dag.spec import TaskSpec
from deepflow.dag.trigger_rules import TriggerRule


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    upstream: tuple[str, ...]
    trigger_rule: TriggerRule = TriggerRule.ALL_SUCCESS
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Dag:
    tasks: dict[str, Node]
    order: tuple[str, ...]
    """Topological order; ties keep declaration order."""
    leaves: tuple[str, ...]
    """Tasks nothing depends on: they decide the job's final state."""

    @classmethod
    def from_nodes(cls, nodes: Sequence[Node]) -> Dag:
        """Build and check a DAG; raises DagError naming the first problem found."""
        tasks: dict[str, Node] = {}
        for i, node in enumerate(nodes):
            if node.name in tasks:
                raise DagError(
                    f"task name {node.name!r} is used twice",
                    f"spec.tasks[{i}].name",
                    "duplicate_task",
                )
            tasks[node.name] = node
        for i, node in enumerate(nodes):
            for dep in node.upstream:
                if dep not in tasks:
                    raise DagError(
                        f"task {node.name!r} depends on unknown task {dep!r}",
                        f"spec.tasks[{i}].depends_on",
                        "unknown_dependency",
                    )
                if dep == node.name:
                    raise DagError(
                        f"task {node.name!r} depends on itself",
                        f"spec.tasks[{i}].depends_on",
                        "dag_cycle",
                    )
        order = _topological_order(tasks)
        has_downstream = {dep for node in nodes for dep in node.upstream}
        leaves = tuple(name for name in order if name not in has_downstream)
        return cls(tasks=tasks, order=order, leaves=leaves)

    @classmethod
    def from_specs(cls, specs: Sequence[TaskSpec]) -> Dag:
        for i, spec in enumerate(specs):
            if not operators.is_registered(spec.operator):
                raise DagError(
                    f"task {spec.name!r} names unknown operator {spec.operator!r} "
                    f"(known: {', '.join(operators.names())})",
                    f"spec.tasks[{i}].operator",
                    "unknown_operator",
                )
            try:
                operators.get(spec.operator).check(spec.args)
            except ValueError as exc:
                raise DagError(
                    f"task {spec.name!r}: {exc}", f"spec.tasks[{i}].args", "invalid_operator_args"
                ) from None
        return cls.from_nodes(
            [
                Node(s.name, tuple(dict.fromkeys(s.depends_on)), s.trigger_rule, s.priority)
                for s in specs
            ]
        )

    def downstream(self, name: str) -> list[str]:
        return [n for n in self.order if name in self.tasks[n].upstream]


def _topological_order(tasks: dict[str, Node]) -> tuple[str, ...]:
    """Kahn's algorithm, always taking the earliest-declared ready task, so ties keep
    declaration order; on a cycle, raise naming one cycle's tasks."""
    position = {name: i for i, name in enumerate(tasks)}
    indegree = {name: len(node.upstream) for name, node in tasks.items()}
    children: dict[str, list[str]] = {name: [] for name in tasks}
    for name, node in tasks.items():
        for dep in node.upstream:
            children[dep].append(name)
    ready = [position[name] for name in tasks if indegree[name] == 0]
    heapq.heapify(ready)
    names = list(tasks)
    order: list[str] = []
    while ready:
        name = names[heapq.heappop(ready)]
        order.append(name)
        for child in children[name]:
            indegree[child] -= 1
            if indegree[child] == 0:
                heapq.heappush(ready, position[child])
    if len(order) < len(tasks):
        cycle = _find_cycle({n for n in tasks if indegree[n] > 0}, tasks)
        raise DagError(f"the tasks form a cycle: {' -> '.join(cycle)}", "spec.tasks", "dag_cycle")
    return tuple(order)


def _find_cycle(stuck: set[str], tasks: dict[str, Node]) -> list[str]:
    """Every stuck task has a stuck upstream; walking upstream must revisit a task."""
    path: list[str] = []
    seen: dict[str, int] = {}
    name = min(stuck)
    while name not in seen:
        seen[name] = len(path)
        path.append(name)
        name = next(u for u in tasks[name].upstream if u in stuck)
    cycle = [*path[seen[name] :], name]
    return list(reversed(cycle))

"""DAG validation and job-kind decomposition: ``plan`` and ``Dag.from_specs``."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from deepflow.dag import KINDS, Dag, DagError, Node, Plan, ResourceClass, TaskSpec, plan
from deepflow.dag.trigger_rules import TriggerRule


def task(name: str, *deps: str, operator: str = "noop", **extra: Any) -> dict[str, Any]:
    return {"name": name, "operator": operator, "depends_on": list(deps), **extra}


def dag_plan(*tasks: dict[str, Any]) -> Plan:
    return plan("dag", {"tasks": list(tasks)})


def rejected(kind: str, spec: Any) -> DagError:
    with pytest.raises(DagError) as info:
        plan(kind, spec)
    return info.value


def rejected_dag(*tasks: dict[str, Any]) -> DagError:
    return rejected("dag", {"tasks": list(tasks)})


def edges(dag: Dag) -> set[tuple[str, str]]:
    """(upstream, downstream) pairs."""
    return {(u, name) for name, node in dag.tasks.items() for u in node.upstream}


def cycle_in(message: str) -> list[str]:
    """The task names in a cycle message ``...: a -> b -> a``."""
    return message.rsplit(": ", 1)[1].split(" -> ")


def assert_is_cycle(names: list[str], deps: dict[str, set[str]]) -> None:
    """``names`` closes on itself and each arrow is a dependency, all in one direction."""
    assert names[0] == names[-1]
    pairs = list(itertools.pairwise(names))
    flow = all(a in deps[b] for a, b in pairs)  # a -> b: b depends on a
    back = all(b in deps[a] for a, b in pairs)  # a -> b: a depends on b
    assert flow or back, names


# --- valid DAGs -------------------------------------------------------------------------


def test_a_valid_dag() -> None:
    result = dag_plan(
        task("a"),
        task("b", "a", priority=3),
        task("c", "a", trigger_rule="one_failed"),
        task("d", "b", "c", "b", operator="sleep", args={"seconds": 0.5}),
        task("e", operator="echo", args={"x": 1}),
    )
    dag = result.dag
    assert [t.name for t in result.tasks] == ["a", "b", "c", "d", "e"]
    assert edges(dag) == {("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")}
    assert dag.tasks["d"].upstream == ("b", "c")  # the repeated dependency counts once
    assert dag.tasks["b"].priority == 3
    assert dag.tasks["c"].trigger_rule is TriggerRule.ONE_FAILED
    assert dag.tasks["a"].trigger_rule is TriggerRule.ALL_SUCCESS
    assert dag.leaves == tuple(n for n in dag.order if n in {"d", "e"})
    assert dag.downstream("a") == ["b", "c"]
    assert dag.downstream("d") == []
    position = {n: i for i, n in enumerate(dag.order)}
    assert sorted(dag.order) == ["a", "b", "c", "d", "e"]
    assert all(position[u] < position[d] for u, d in edges(dag))
    assert result.spec["tasks"][1]["priority"] == 3


def test_order_and_leaves_of_a_chain_declared_backwards() -> None:
    dag = dag_plan(task("c", "b"), task("b", "a"), task("a")).dag
    assert dag.order == ("a", "b", "c")
    assert dag.leaves == ("c",)


def test_independent_tasks_keep_declaration_order() -> None:
    dag = dag_plan(task("z"), task("m"), task("a")).dag
    assert dag.order == ("z", "m", "a")
    assert dag.leaves == ("z", "m", "a")


def test_order_ties_keep_declaration_order() -> None:
    """``Dag.order``'s docstring: topological order, ties keep declaration order. p and q
    are alike (each has one root parent), and declared p first."""
    dag = Dag.from_nodes([Node("x", ()), Node("y", ()), Node("p", ("y",)), Node("q", ("x",))])
    assert dag.order == ("x", "y", "p", "q")


def test_from_specs_directly() -> None:
    specs = [
        TaskSpec(name="a", operator="noop"),
        TaskSpec(name="b", operator="noop", depends_on=["a"]),
    ]
    dag = Dag.from_specs(specs)
    assert dag.order == ("a", "b")
    assert dag.leaves == ("b",)


def test_a_single_task() -> None:
    dag = dag_plan(task("only")).dag
    assert dag.order == dag.leaves == ("only",)


# --- cycles -----------------------------------------------------------------------------


def test_self_loop() -> None:
    err = rejected_dag(task("a"), task("b", "a", "b"))
    assert err.code == "dag_cycle"
    assert err.param == "spec.tasks[1].depends_on"
    assert "'b'" in err.message
    assert "itself" in err.message


def test_two_cycle() -> None:
    err = rejected_dag(task("a", "b"), task("b", "a"))
    assert err.code == "dag_cycle"
    assert err.param == "spec.tasks"
    names = cycle_in(err.message)
    assert set(names) == {"a", "b"}
    assert len(names) == 3
    assert_is_cycle(names, {"a": {"b"}, "b": {"a"}})


def test_longer_cycle_names_only_its_tasks() -> None:
    deps = {
        "root": set(),
        "a": {"root", "c"},
        "b": {"a"},
        "c": {"b"},
        "after": {"c"},
        "alone": set(),
    }
    err = rejected_dag(*(task(name, *sorted(ups)) for name, ups in deps.items()))
    assert err.code == "dag_cycle"
    assert err.param == "spec.tasks"
    names = cycle_in(err.message)
    assert len(names) == 4
    assert set(names) == {"a", "b", "c"}
    assert_is_cycle(names, deps)


def test_cycle_found_when_the_smallest_stuck_name_is_not_on_it() -> None:
    # "aa" only hangs below the cycle x -> y -> z -> x.
    deps = {"aa": {"x"}, "x": {"z"}, "y": {"x"}, "z": {"y"}}
    err = rejected_dag(*(task(name, *sorted(ups)) for name, ups in deps.items()))
    names = cycle_in(err.message)
    assert set(names) == {"x", "y", "z"}
    assert_is_cycle(names, deps)


def test_cycle_through_from_nodes() -> None:
    with pytest.raises(DagError) as info:
        Dag.from_nodes([Node("a", ("c",)), Node("b", ("a",)), Node("c", ("b",))])
    assert info.value.code == "dag_cycle"
    assert set(cycle_in(info.value.message)) == {"a", "b", "c"}


# --- other structural errors ------------------------------------------------------------


def test_unknown_dependency() -> None:
    err = rejected_dag(task("a"), task("b", "a", "ghost"))
    assert err.code == "unknown_dependency"
    assert err.param == "spec.tasks[1].depends_on"
    assert "'b'" in err.message
    assert "'ghost'" in err.message


def test_duplicate_names() -> None:
    err = rejected_dag(task("a"), task("b"), task("a", "b"))
    assert err.code == "duplicate_task"
    assert err.param == "spec.tasks[2].name"
    assert "'a'" in err.message


def test_unknown_operator() -> None:
    err = rejected_dag(task("a"), task("b", "a", operator="teleport"))
    assert err.code == "unknown_operator"
    assert err.param == "spec.tasks[1].operator"
    assert "'teleport'" in err.message
    assert "noop" in err.message  # lists the known ones


def test_empty_dag() -> None:
    err = rejected("dag", {"tasks": []})
    assert err.code == "invalid_spec"
    assert err.param == "spec.tasks"


# --- task spec fields -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_task", "param", "words"),
    [
        (task("a", retry=3), "spec.tasks[1].retry", "not permitted"),
        (task("a", dependencies=["x"]), "spec.tasks[1].dependencies", "not permitted"),
        (task("a", trigger_rule="all_sucess"), "spec.tasks[1].trigger_rule", "all_success"),
        (task("a b"), "spec.tasks[1].name", "pattern"),
        (task(""), "spec.tasks[1].name", "at least 1"),
        (task("a", retries=-1), "spec.tasks[1].retries", "greater than or equal to 0"),
        (task("a", retries=101), "spec.tasks[1].retries", "less than or equal to 100"),
        (task("a", timeout_s=0), "spec.tasks[1].timeout_s", "greater than 0"),
        (task("a", timeout_s=86401), "spec.tasks[1].timeout_s", "less than or equal"),
        (task("a", priority=1001), "spec.tasks[1].priority", "less than or equal to 1000"),
        (task("a", resource_class="tpu"), "spec.tasks[1].resource_class", "cuda"),
        ({"name": "a"}, "spec.tasks[1].operator", "required"),
        (task("a", depends_on="b"), "spec.tasks[1].depends_on", "list"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_task_fields(bad_task: dict[str, Any], param: str, words: str) -> None:
    err = rejected_dag(task("ok"), bad_task)
    assert err.code == "invalid_spec"
    assert err.param == param
    assert err.message.startswith(f"{param}: ")
    assert words in err.message


def test_unknown_top_level_field() -> None:
    err = rejected("dag", {"tasks": [task("a")], "schedule": "daily"})
    assert err.code == "invalid_spec"
    assert err.param == "spec.schedule"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"seconds": "ten"}, "number"),
        ({"seconds": None}, "number"),
        ({"seconds": True}, "number"),
        ({"seconds": [1]}, "number"),
        ({"seconds": -1}, "between 0 and 86400"),
        ({"seconds": 86401}, "between 0 and 86400"),
        ({"seconds": 1, "extra": 2}, "extra"),
    ],
)
def test_bad_operator_args(args: dict[str, Any], words: str) -> None:
    err = rejected_dag(task("a"), task("nap", "a", operator="sleep", args=args))
    assert err.code == "invalid_operator_args"
    assert err.param == "spec.tasks[1].args"
    assert "'nap'" in err.message
    assert words in err.message


@pytest.mark.parametrize("args", [{}, {"seconds": 0}, {"seconds": 2}, {"seconds": 0.25}])
def test_good_sleep_args(args: dict[str, Any]) -> None:
    assert dag_plan(task("nap", operator="sleep", args=args)).dag.order == ("nap",)


def test_dag_error_is_a_value_error_with_defaults() -> None:
    err = DagError("boom")
    assert isinstance(err, ValueError)
    assert str(err) == err.message == "boom"
    assert err.param is None
    assert err.code == "invalid_dag"


# --- kinds ------------------------------------------------------------------------------


def test_known_kinds() -> None:
    assert set(KINDS) == {"dag", "deploy", "finetune", "batch", "pipeline"}


def test_unknown_kind() -> None:
    err = rejected("train", {"model": "m"})
    assert err.code == "unknown_kind"
    assert err.param == "kind"
    assert "'train'" in err.message
    assert all(kind in err.message for kind in KINDS)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("spec", [None, [], "model", 3])
def test_spec_must_be_an_object(kind: str, spec: Any) -> None:
    err = rejected(kind, spec)
    assert err.code == "invalid_spec"
    assert err.param == "spec"


def test_serve_launching_three_replicas() -> None:
    result = plan("deploy", {"deployment_id": "dep_1", "launch": 3, "resource_class": "cuda"})
    dag = result.dag
    assert [t.name for t in result.tasks] == [
        "prepare_weights",
        "launch_replica_0",
        "health_check_0",
        "launch_replica_1",
        "health_check_1",
        "launch_replica_2",
        "health_check_2",
        "update_deployment",
    ]
    assert edges(dag) == {
        ("prepare_weights", "launch_replica_0"),
        ("prepare_weights", "launch_replica_1"),
        ("prepare_weights", "launch_replica_2"),
        ("launch_replica_0", "health_check_0"),
        ("launch_replica_1", "health_check_1"),
        ("launch_replica_2", "health_check_2"),
        ("health_check_0", "update_deployment"),
        ("health_check_1", "update_deployment"),
        ("health_check_2", "update_deployment"),
    }
    assert dag.order[0] == "prepare_weights"
    assert dag.leaves == ("update_deployment",)
    rules = {name: node.trigger_rule for name, node in dag.tasks.items()}
    assert rules.pop("update_deployment") is TriggerRule.ALL_DONE
    assert set(rules.values()) == {TriggerRule.ALL_SUCCESS}
    by_name = {t.name: t for t in result.tasks}
    assert by_name["launch_replica_1"].operator == "deploy.launch_replica"
    assert by_name["launch_replica_1"].args == {"deployment_id": "dep_1", "replica": 1}
    assert by_name["launch_replica_1"].resource_class is ResourceClass.CUDA
    assert by_name["launch_replica_1"].retries == 2
    assert by_name["health_check_2"].resource_class is ResourceClass.CPU
    assert by_name["prepare_weights"].resource_class is ResourceClass.CPU


def test_serve_stopping_instances_needs_no_weights() -> None:
    result = plan("deploy", {"deployment_id": "dep_1", "stop": ["inst_a", "inst_b"]})
    assert [t.name for t in result.tasks] == ["stop_0", "stop_1", "update_deployment"]
    assert edges(result.dag) == {("stop_0", "update_deployment"), ("stop_1", "update_deployment")}
    assert result.tasks[1].args == {"instance_id": "inst_b"}


def test_serve_that_does_nothing_is_refused() -> None:
    err = rejected("deploy", {"deployment_id": "dep_1"})
    assert err.code == "invalid_spec"
    assert "launch replicas or stop instances" in str(err)


def test_finetune_is_a_chain() -> None:
    hyper = {"n_epochs": 3}
    result = plan(
        "finetune",
        {
            "model": "m",
            "training_file": "file-1",
            "method": {"supervised": {"hyperparameters": hyper}},
            "resource_class": "npu",
            "deploy": True,
        },
    )
    chain = ["validate_data", "tokenize", "train", "evaluate", "register_model", "deploy"]
    assert [t.name for t in result.tasks] == chain
    assert result.dag.order == tuple(chain)
    assert edges(result.dag) == set(itertools.pairwise(chain))
    assert result.dag.leaves == ("deploy",)
    by_name = {t.name: t for t in result.tasks}
    assert by_name["train"].resource_class is ResourceClass.NPU
    assert by_name["evaluate"].resource_class is ResourceClass.NPU
    assert by_name["train"].timeout_s == 24 * 3600.0 and by_name["train"].retries == 3
    assert by_name["validate_data"].resource_class is ResourceClass.CPU
    job = by_name["train"].args["job"]
    assert job["training_file"] == "file-1"
    assert job["method"]["supervised"]["hyperparameters"] == {
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
    }
    assert job["method"]["supervised"]["lora"] is None  # full fine-tuning unless asked
    assert "deploy" not in [
        t.name for t in plan("finetune", {"model": "m", "training_file": "f"}).tasks
    ]


def test_batch_fans_out_over_shards() -> None:
    result = plan("batch", {"model": "m", "input_file": "in.jsonl", "num_shards": 4})
    shards = [f"run_shard_{i}" for i in range(4)]
    assert [t.name for t in result.tasks] == ["split_input", *shards, "merge_results"]
    assert edges(result.dag) == {("split_input", s) for s in shards} | {
        (s, "merge_results") for s in shards
    }
    assert result.dag.order == ("split_input", *shards, "merge_results")
    assert result.dag.leaves == ("merge_results",)
    assert result.dag.tasks["merge_results"].trigger_rule is TriggerRule.ALL_SUCCESS
    by_name = {t.name: t for t in result.tasks}
    assert by_name["run_shard_2"].args == {
        "model": "m",
        "input_file": "in.jsonl",
        "num_shards": 4,
        "shard": 2,
    }
    assert by_name["run_shard_2"].retries == 2


@pytest.mark.parametrize(
    ("kind", "spec", "param"),
    [
        ("deploy", {"launch": 1}, "spec.deployment_id"),
        ("deploy", {"deployment_id": ""}, "spec.deployment_id"),
        ("deploy", {"deployment_id": "d", "launch": -1}, "spec.launch"),
        ("deploy", {"deployment_id": "d", "launch": 65}, "spec.launch"),
        ("deploy", {"deployment_id": "d", "launch": "many"}, "spec.launch"),
        ("deploy", {"deployment_id": "d", "stop": "inst_1"}, "spec.stop"),
        ("deploy", {"deployment_id": "d", "launch": 1, "gpus": 2}, "spec.gpus"),
        ("finetune", {"model": "m"}, "spec.training_file"),
        (
            "finetune",
            {
                "model": "m",
                "training_file": "f",
                "method": {"supervised": {"hyperparameters": {"n_epochs": 0}}},
            },
            "spec.method.supervised.hyperparameters.n_epochs",
        ),
        (
            "finetune",
            {
                "model": "m",
                "training_file": "f",
                "method": {"supervised": {"hyperparameters": {"lr": 1}}},
            },
            "spec.method.supervised.hyperparameters.lr",
        ),
        ("finetune", {"model": "m", "training_file": "f", "suffix": "x" * 65}, "spec.suffix"),
        ("batch", {"model": "m"}, "spec.input_file"),
        ("batch", {"model": "m", "input_file": "f", "num_shards": 0}, "spec.num_shards"),
        ("batch", {"model": "m", "input_file": "f", "num_shards": 257}, "spec.num_shards"),
        (
            "batch",
            {"model": "m", "input_file": "f", "resource_class": "tpu"},
            "spec.resource_class",
        ),
        ("dag", {}, "spec.tasks"),
    ],
)
def test_kinds_reject_bad_specs(kind: str, spec: dict[str, Any], param: str) -> None:
    err = rejected(kind, spec)
    assert err.code == "invalid_spec"
    assert err.param == param
    assert err.message.startswith(f"{param}: ")


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("deploy", {"deployment_id": "d", "launch": 64, "stop": ["i"]}),
        ("finetune", {"model": "m", "training_file": "f", "validation_file": "v"}),
        ("batch", {"model": "m", "input_file": "f", "num_shards": 256}),
    ],
)
def test_kind_tasks_name_registered_operators(kind: str, spec: dict[str, Any]) -> None:
    result = plan(kind, spec)
    assert all(t.operator.startswith(f"{kind}.") for t in result.tasks)
    assert len(result.dag.tasks) == len(result.tasks)

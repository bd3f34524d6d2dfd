"""Which job kinds users may submit: each kind's ``refusal`` and ``plan_user_job``."""

from __future__ import annotations

from typing import Any

import pytest

from deepflow.dag import KINDS, DagError, operators, plan
from deepflow.dag.kinds import plan_user_job

SPECS: dict[str, dict[str, Any]] = {
    "dag": {"tasks": [{"name": "a", "operator": "noop"}]},
    "deploy": {"deployment_id": "dep_1", "launch": 1},
    "finetune": {"model": "tiny", "training_file": "train.jsonl"},
    "batch": {"model": "tiny", "input_file": "prompts.jsonl"},
    "pipeline": {"model": "tiny", "training_file": "file-a", "validation_file": "file-b"},
}
REFUSED = {
    "deploy": "use_deployments",
    "finetune": "use_fine_tuning",
    "batch": "use_batches",
}


def test_every_kind_has_a_sample_spec() -> None:
    assert set(SPECS) == set(KINDS)


def test_users_may_submit_dag_jobs() -> None:
    assert plan_user_job("dag", SPECS["dag"]) == plan("dag", SPECS["dag"])
    with pytest.raises(DagError) as info:
        plan_user_job("dag", {"tasks": []})
    assert info.value.code == "invalid_spec"


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_kinds_are_refused_on_kind_naming_the_kind(kind: str) -> None:
    """Refused before the spec is read (a valid spec or none at all), with the kind's code;
    the platform itself may still plan the kind."""
    for spec in (SPECS[kind], {"bogus": 1}, None):
        with pytest.raises(DagError) as info:
            plan_user_job(kind, spec)
        assert (info.value.param, info.value.code) == ("kind", REFUSED[kind])
        assert kind in info.value.message
    assert plan(kind, SPECS[kind]).tasks


def test_only_the_refused_kinds_are_refused() -> None:
    assert {name for name, kind in KINDS.items() if kind.refusal is not None} == set(REFUSED)


def test_an_unknown_kind_is_unknown_to_users_too() -> None:
    with pytest.raises(DagError) as info:
        plan_user_job("train", {})
    assert (info.value.param, info.value.code) == ("kind", "unknown_kind")


def test_batch_operators_are_implemented_and_run_by_the_platform_only() -> None:
    """The Batch API makes batch jobs; their operators find the batch by the job's id."""
    for task in plan("batch", {**SPECS["batch"], "num_shards": 3}).tasks:
        op = operators.get(task.operator)
        assert op.run is not None and op.internal and op.takes_context, task.operator


def test_a_pipeline_promotes_after_evaluating_and_a_rollout_replaces_after_health() -> None:
    pipeline = plan_user_job("pipeline", SPECS["pipeline"])
    names = [t.name for t in pipeline.tasks]
    assert names == ["validate_data", "tokenize", "train", "evaluate", "promote", "redeploy"]
    rollout = plan("deploy", {"deployment_id": "d", "launch": 2, "replace": ["i1", "i2"]})
    replaces = [t for t in rollout.tasks if t.name.startswith("replace_")]
    assert [t.args["instance_id"] for t in replaces] == ["i1", "i2"]
    assert all(t.depends_on == ["health_check_0", "health_check_1"] for t in replaces)
    with pytest.raises(DagError, match="only with replicas it launches"):
        plan("deploy", {"deployment_id": "d", "stop": ["i1"], "replace": ["i2"]})

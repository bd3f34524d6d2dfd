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

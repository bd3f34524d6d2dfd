"""Job kinds, how each decomposes into a task DAG, and which ones users may submit.

``dag`` takes the user's tasks as declared. ``deploy``, ``finetune``, ``pipeline`` and
``batch`` take a small spec and generate their DAG's shape here; their operators are declared
by name and implemented by the serving, fine-tuning and batch modules.

Not every kind is taken from users: ``deploy`` jobs are made by the deployments API,
``finetune`` jobs by the fine-tuning API (which checks the files against the model before
anything is queued), and ``batch`` jobs by the Batch API (which checks the input file and the
model first). Each ``JobKind`` says so (``refusal``), and ``plan_user_job`` is the one check
every way in for a user's job applies (our API's ``POST /v1/jobs``, a flow run started from
Prefect with a spec).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deepflow.dag import operators
from deepflow.dag.errors import DagError, format_loc
from deepflow.dag.graph import Dag
from deepflow.dag.spec import DagJobSpec, ResourceClass, TaskSpec
from deepflow.dag.trigger_rules import TriggerRule


class DeploySpec(BaseModel):
    """One step of a deployment's convergence (``deepflow.replicas.converge`` writes these):
    launch ``launch`` more replicas and/or stop the instances in ``stop``; the instances in
    ``replace`` are stopped only once every launched replica is healthy (a rolling update to
    new weights: if the new ones fail, the old ones keep serving)."""

    model_config = ConfigDict(extra="forbid")

    deployment_id: str = Field(min_length=1, max_length=40)
    launch: int = Field(default=0, ge=0, le=64)
    stop: list[str] = Field(default_factory=list, max_length=64)
    replace: list[str] = Field(default_factory=list, max_length=64)
    resource_class: ResourceClass = ResourceClass.CPU
    """Where replicas launch (their daemons take that worker's device)."""
    reason: str = Field(default="", max_length=200)

    @model_validator(mode="after")
    def _does_something(self) -> DeploySpec:
        if not self.launch and not self.stop:
            raise ValueError("a deploy job must launch replicas or stop instances")
        if self.replace and not self.launch:
            raise ValueError("a deploy job replaces instances only with replicas it launches")
        return self


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int = Field(default=3, ge=1, le=100)
    batch_size: int = Field(default=8, ge=1, le=4096)
    learning_rate_multiplier: float = Field(default=1.0, gt=0.0, le=100.0)


class Lora(BaseModel):
    """Train low-rank adapters (peft's LoRA) on every linear layer instead of all weights."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0.0, le=1024.0)


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    lora: Lora | None = None
    """None: full fine-tuning (every weight trains)."""


class Method(BaseModel):
    """OpenAI's ``method``; only ``supervised`` is offered, with LoRA as our extension."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"] = "supervised"
    supervised: Supervised = Field(default_factory=Supervised)


class FinetuneSpec(BaseModel):
    """A fine-tuning job as ``/v1/fine_tuning/jobs`` takes it (files by id, model by name)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=40)
    validation_file: str | None = Field(default=None, max_length=40)
    method: Method = Field(default_factory=Method)
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(default=10, ge=1, le=100_000)
    """Optimizer steps between checkpoints (a killed worker redoes at most this many)."""
    max_seq_len: int = Field(default=1024, ge=16, le=131_072)
    """Longest example in tokens; a longer one is refused at creation, naming its line."""
    deploy: bool = False
    """Deploy the fine-tuned model (one replica) once it is registered."""
    resource_class: ResourceClass = ResourceClass.CPU


class PipelineSpec(BaseModel):
    """A post-training pipeline's run: fine-tune the model's newest ready version (the one its
    deployment serves), score it on the validation file, and promote it (a new version of the
    same model, rolled out to its deployment) only when its held-out loss is lower."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=40)
    validation_file: str = Field(min_length=1, max_length=40)
    method: Method = Field(default_factory=Method)
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(default=10, ge=1, le=100_000)
    max_seq_len: int = Field(default=1024, ge=16, le=131_072)
    resource_class: ResourceClass = ResourceClass.CPU


class BatchSpec(BaseModel):
    """A batch as ``/v1/batches`` makes it: its model and input file (by id), split into
    ``num_shards`` tasks that each run their part of the file through an offline engine."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    input_file: str = Field(min_length=1, max_length=40)
    num_shards: int = Field(default=1, ge=1, le=256)
    resource_class: ResourceClass = ResourceClass.CPU


def _dag_tasks(spec: DagJobSpec) -> list[TaskSpec]:
    return list(spec.tasks)


HEALTH_CHECK_TIMEOUT_S = 75.0
"""A health check gives up by itself after 60 s (``replicas.operators.HEALTH_TIMEOUT_S``);
an attempt that outlives this was stuck (one was seen hung for minutes on a loaded machine, its
cause not found), and is stopped and tried once more in a fresh attempt process rather than
holding the deployment in ``creating`` for the default hour."""


def _deploy_tasks(spec: DeploySpec) -> list[TaskSpec]:
    target = {"deployment_id": spec.deployment_id}
    tasks: list[TaskSpec] = []
    if spec.launch:
        tasks.append(
            TaskSpec(name="prepare_weights", operator="deploy.prepare_weights", args=target)
        )
    for i in range(spec.launch):
        tasks.append(
            TaskSpec(
                name=f"launch_replica_{i}",
                operator="deploy.launch_replica",
                args={**target, "replica": i},
                depends_on=["prepare_weights"],
                resource_class=spec.resource_class,
                retries=2,
            )
        )
        tasks.append(
            TaskSpec(
                name=f"health_check_{i}",
                operator="deploy.health_check",
                args={"replica": i},
                depends_on=[f"launch_replica_{i}"],
                timeout_s=HEALTH_CHECK_TIMEOUT_S,
                retries=1,
            )
        )
    for k, instance_id in enumerate(spec.stop):
        tasks.append(
            TaskSpec(
                name=f"stop_{k}", operator="deploy.stop_instance", args={"instance_id": instance_id}
            )
        )
    healthy = [f"health_check_{i}" for i in range(spec.launch)]
    for k, instance_id in enumerate(spec.replace):
        tasks.append(
            TaskSpec(
                name=f"replace_{k}",
                operator="deploy.stop_instance",
                args={"instance_id": instance_id},
                depends_on=healthy,
            )
        )
    tasks.append(
        TaskSpec(
            name="update_deployment",
            operator="deploy.update_deployment",
            args=target,
            depends_on=[
                t.name for t in tasks if t.name.startswith(("health_check_", "stop_", "replace_"))
            ],
            # Settles the deployment on whatever came up or stopped (failed if nothing did).
            trigger_rule=TriggerRule.ALL_DONE,
        )
    )
    return tasks


TRAIN_RETRIES = 3
"""A killed worker's training attempt resumes from its last checkpoint in the next attempt."""


def _finetune_tasks(spec: FinetuneSpec) -> list[TaskSpec]:
    args = {"job": spec.model_dump(mode="json")}
    on_device = {"resource_class": spec.resource_class}
    tasks = [
        TaskSpec(name="validate_data", operator="finetune.validate_data", args=args),
        TaskSpec(
            name="tokenize", operator="finetune.tokenize", args=args, depends_on=["validate_data"]
        ),
        TaskSpec(
            name="train",
            operator="finetune.train",
            args=args,
            depends_on=["tokenize"],
            timeout_s=24 * 3600.0,
            retries=TRAIN_RETRIES,
            **on_device,
        ),
        TaskSpec(
            name="evaluate",
            operator="finetune.evaluate",
            args=args,
            depends_on=["train"],
            retries=1,
            **on_device,
        ),
        TaskSpec(
            name="register_model",
            operator="finetune.register_model",
            args=args,
            depends_on=["evaluate"],
            retries=1,
        ),
    ]
    if spec.deploy:
        tasks.append(
            TaskSpec(
                name="deploy", operator="finetune.deploy", args=args, depends_on=["register_model"]
            )
        )
    return tasks


BATCH_WINDOW_S = 24 * 3600.0
"""OpenAI's completion window: a shard may run that long (the batch expires after it)."""


def _pipeline_tasks(spec: PipelineSpec) -> list[TaskSpec]:
    training = _finetune_tasks(FinetuneSpec.model_validate(spec.model_dump()))
    args = {"job": spec.model_dump(mode="json")}
    return [
        *(t for t in training if t.name != "register_model"),
        TaskSpec(
            name="promote", operator="pipeline.promote", args=args, depends_on=["evaluate"]
        ),
        TaskSpec(
            name="redeploy",
            operator="pipeline.redeploy",
            args=args,
            depends_on=["promote"],
            timeout_s=900.0,
        ),
    ]


def _batch_tasks(spec: BatchSpec) -> list[TaskSpec]:
    args = {"model": spec.model, "input_file": spec.input_file, "num_shards": spec.num_shards}
    shards = [
        TaskSpec(
            name=f"run_shard_{i}",
            operator="batch.run_shard",
            args={**args, "shard": i},
            depends_on=["split_input"],
            resource_class=spec.resource_class,
            timeout_s=BATCH_WINDOW_S,
            retries=2,  # a retried shard resumes from the results it has written
        )
        for i in range(spec.num_shards)
    ]
    return [
        TaskSpec(name="split_input", operator="batch.split_input", args=args, retries=1),
        *shards,
        TaskSpec(
            name="merge_results",
            operator="batch.merge_results",
            args=args,
            depends_on=[s.name for s in shards],
            retries=1,
        ),
    ]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why users may not submit a kind: the error's ``code`` and ``message``."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class JobKind:
    name: str
    spec_model: type[BaseModel]
    tasks: Callable[[Any], list[TaskSpec]]
    refusal: Refusal | None = None
    """None when users may submit the kind; else why not (the platform may still plan it)."""


KINDS: dict[str, JobKind] = {
    k.name: k
    for k in (
        JobKind("dag", DagJobSpec, _dag_tasks),
        JobKind(
            "deploy",
            DeploySpec,
            _deploy_tasks,
            Refusal(
                "use_deployments",
                "deploy jobs are made by the deployments API: POST /v1/deployments",
            ),
        ),
        JobKind(
            "finetune",
            FinetuneSpec,
            _finetune_tasks,
            Refusal(
                "use_fine_tuning",
                "finetune jobs are made by the fine-tuning API, which checks their files "
                "first: POST /v1/fine_tuning/jobs",
            ),
        ),
        JobKind(
            "batch",
            BatchSpec,
            _batch_tasks,
            Refusal(
                "use_batches",
                "batch jobs are made by the Batch API, which checks the input file and the "
                "model first: POST /v1/batches",
            ),
        ),
        # Started by a schedule (a Prefect deployment of the pipeline flow) or Prefect's API.
        JobKind("pipeline", PipelineSpec, _pipeline_tasks),
    )
}

for _name, _what in [
    ("deploy.prepare_weights", "Checks a model folder and reads it into the page cache."),
    ("deploy.launch_replica", "Starts one FlowServe engine daemon."),
    ("deploy.health_check", "Waits until a replica answers its health check."),
    ("deploy.stop_instance", "Drains an instance and waits until it exited."),
    ("deploy.update_deployment", "Settles the deployment's state on its live instances."),
    ("finetune.validate_data", "Checks the training and validation files."),
    ("finetune.tokenize", "Renders and tokenizes the examples with the chat template."),
    ("finetune.train", "Runs the training loop, with checkpoints."),
    ("finetune.evaluate", "Scores the trained weights on held-out data."),
    ("finetune.register_model", "Registers the weights as a new model version."),
    ("finetune.deploy", "Deploys the fine-tuned model."),
    ("pipeline.promote", "Registers the new weights if their held-out loss is lower."),
    ("pipeline.redeploy", "Waits for the deployment to serve the promoted version."),
    ("batch.split_input", "Splits the input file into shards."),
    ("batch.run_shard", "Runs one shard's requests through an offline engine."),
    ("batch.merge_results", "Writes the output and error files in the input's order."),
]:
    operators.declare(_name, _what)


@dataclass(frozen=True, slots=True)
class Plan:
    """A job kind's spec, validated, with its tasks and their DAG."""

    spec: dict[str, Any]
    tasks: list[TaskSpec]
    dag: Dag


def _kind(kind: str) -> JobKind:
    job_kind = KINDS.get(kind)
    if job_kind is None:
        raise DagError(
            f"unknown job kind {kind!r} (known: {', '.join(KINDS)})", "kind", "unknown_kind"
        )
    return job_kind


def plan_user_job(kind: str, spec: Any) -> Plan:
    """``plan`` for a job a user submits (through our API or Prefect's): a kind users may not
    submit is refused first, with a DagError on ``kind`` carrying its refusal's code."""
    refusal = _kind(kind).refusal
    if refusal is not None:
        raise DagError(refusal.message, "kind", refusal.code)
    planned = plan(kind, spec)
    for i, task in enumerate(planned.tasks):
        if operators.get(task.operator).internal:
            raise DagError(
                f"task {task.name!r}: operator {task.operator!r} is run by the platform's own "
                "jobs only (deployments run it: POST /v1/deployments)",
                f"spec.tasks[{i}].operator",
                "operator_not_allowed",
            )
    return planned


def plan(kind: str, spec: Any) -> Plan:
    """Validate ``spec`` for ``kind`` and decompose it; raises DagError naming the problem.
    Any kind, also one users may not submit (the platform's own deploy jobs)."""
    job_kind = _kind(kind)
    if not isinstance(spec, dict):
        raise DagError("spec must be a JSON object", "spec", "invalid_spec")
    try:
        parsed = job_kind.spec_model.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = format_loc(("spec", *err["loc"]))
        raise DagError(f"{where}: {err['msg']}", where, "invalid_spec") from None
    tasks = job_kind.tasks(parsed)
    return Plan(parsed.model_dump(mode="json"), tasks, Dag.from_specs(tasks))

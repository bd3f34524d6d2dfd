"""The ``finetune`` job kind's operators: validate -> tokenize -> train -> evaluate -> register
-> (deploy); and a ``pipeline``'s, which trains the same way, then promotes and rolls out.

Everything a task hands the next one lives under the job's folder
(``DEEPFLOW_HOME/fine_tuning/<job id>/``): the tokenized examples, the checkpoints. The base
model's version is pinned by ``validate_data``, so a version registered meanwhile changes
nothing. A plugin of the operator registry (``finetune`` in our pyproject's entry points);
torch and transformers are imported only inside the operators that train or score.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from deepflow import files
from deepflow.config import Settings
from deepflow.dag.operators import Operator, OperatorFailed
from deepflow.dag.spec import ResourceClass
from deepflow.finetune import data
from deepflow.model_import import version_folder
from deepflow.store import (
    Database,
    ModelVersionState,
    create_deployment,
    get_database,
    list_deployments,
    newest_ready_version,
    register_model_version,
    set_model_version_state,
)
from deepflow.store import files as file_rows
from deepflow.store import fine_tuning as runs
from deepflow.store.errors import Conflict, NotFound
from deepflow.store.orm import Task, TrainingStep

SAMPLE_PROMPTS = 3
SAMPLE_TOKENS = 40
DEFAULT_POLICY = "prefix_cache_aware"
"""The deployments API's default routing policy."""


def _db() -> Database:
    return get_database(Settings.from_env().database_url)


def job_folder(job_id: str) -> Path:
    return Settings.from_env().ensure_home() / "fine_tuning" / job_id


def fine_tuned_name(spec: dict[str, Any], job_id: str) -> str:
    """OpenAI's style, ``ft:<base>:<suffix>``; without a suffix the job's id names it. Jobs
    with the same base and suffix add versions of one model (a pipeline's runs do)."""
    return f"ft:{spec['model']}:{spec.get('suffix') or job_id}"


def _file(tenant_id: str, file_id: str, param: str) -> dict[str, Any]:
    with _db().transaction() as session:
        try:
            row = file_rows.read_file(session, tenant_id, file_id)
        except NotFound:
            raise OperatorFailed(f"{param} {file_id} does not exist") from None
        if row.purpose != "fine-tune":
            raise OperatorFailed(f"{param} {file_id} has purpose {row.purpose!r}, not fine-tune")
        sha256 = row.sha256
    path = files.path(Settings.from_env().ensure_home(), tenant_id, file_id)
    return {"id": file_id, "sha256": sha256, "path": str(path)}


def validate_data(args: dict[str, Any]) -> dict[str, Any]:
    """The files are the tenant's, for fine-tuning, and whole; the base model is ready."""
    spec, tenant_id = args["job"], args["context"]["tenant_id"]
    found = {"training_file": _file(tenant_id, spec["training_file"], "training_file")}
    if spec.get("validation_file"):
        found["validation_file"] = _file(tenant_id, spec["validation_file"], "validation_file")
    for param, f in found.items():
        try:
            files.check("fine-tune", Path(f["path"]).read_bytes())
        except (files.InvalidFile, OSError) as exc:
            raise OperatorFailed(f"{param} {f['id']}: {exc}") from None
    with _db().transaction() as session:
        try:
            version = newest_ready_version(session, tenant_id, spec["model"])
        except NotFound:
            version = None
        if version is None:
            raise OperatorFailed(f"model {spec['model']!r} has no ready version")
        base = {"name": spec["model"], "version": version.version, "uri": version.uri}
    return {**found, "base": base}


def _tokenizer(base_uri: str) -> Any:
    from deepflow.engine.tokenizer import Tokenizer

    return Tokenizer.from_folder(base_uri)


def context_length(base_uri: str, max_seq_len: int) -> int:
    import json

    config = json.loads((Path(base_uri) / "config.json").read_text())
    return min(max_seq_len, int(config.get("max_position_embeddings", max_seq_len)))


def tokenize(args: dict[str, Any]) -> dict[str, Any]:
    """Render and tokenize every example with the base model's chat template; hold out a tenth
    of the training file to score on when no validation file was given."""
    spec, context = args["job"], args["context"]
    checked = context["upstream"]["validate_data"]
    base = checked["base"]["uri"]
    tokenizer, limit = _tokenizer(base), context_length(base, spec["max_seq_len"])
    try:
        train = data.encode_file(tokenizer, Path(checked["training_file"]["path"]), limit)
        if "validation_file" in checked:
            valid = data.encode_file(tokenizer, Path(checked["validation_file"]["path"]), limit)
        else:
            train, valid = data.hold_out(train, spec["seed"])
    except files.InvalidFile as exc:
        raise OperatorFailed(str(exc)) from None
    folder = job_folder(context["job_id"])
    folder.mkdir(parents=True, exist_ok=True)
    data.save(folder / "examples.json", train, valid)
    hyper = spec["method"]["supervised"]["hyperparameters"]
    steps = math.ceil(len(train) / hyper["batch_size"]) * hyper["n_epochs"]
    tokens = sum(len(e.input_ids) for e in train)
    return {
        "train_examples": len(train),
        "valid_examples": len(valid),
        "total_steps": steps,
        "trained_tokens": tokens * hyper["n_epochs"],
    }


def _plan(spec: dict[str, Any], base_uri: str) -> Any:
    from deepflow.finetune.train import BASE_LEARNING_RATE, Plan

    supervised = spec["method"]["supervised"]
    hyper, lora = supervised["hyperparameters"], supervised.get("lora")
    rate = BASE_LEARNING_RATE["lora" if lora else "full"] * hyper["learning_rate_multiplier"]
    return Plan(
        base=Path(base_uri),
        lora=lora,
        epochs=hyper["n_epochs"],
        batch_size=hyper["batch_size"],
        learning_rate=rate,
        seed=spec["seed"],
        checkpoint_every=spec["checkpoint_every"],
        device=_device(spec),
    )


def _device(spec: dict[str, Any]) -> str:
    """The accelerator of the worker's resource class (the first it is pinned to), or cpu."""
    from deepflow.engine.device import Device

    return str(Device.pick(spec["resource_class"]).torch_device)


class _StoreProgress:
    """The training loop's reports, written to the store as they happen."""

    def __init__(self, db: Database, job_id: str, tenant_id: str) -> None:
        self.db, self.job_id, self.tenant_id = db, job_id, tenant_id

    def step(self, step: int, epoch: int, loss: float, tokens: int, lr: float) -> None:
        with self.db.transaction() as session:
            runs.record_step(
                session,
                self.job_id,
                self.tenant_id,
                step=step,
                epoch=epoch,
                train_loss=loss,
                tokens=tokens,
                learning_rate=lr,
            )

    def checkpoint(self, step: int, path: Path, loss: float, valid_loss: float | None) -> None:
        """Recorded with the step's held-out loss; only the newest KEEP_CHECKPOINTS stay (a
        full fine-tune's checkpoint holds every weight and twice that in optimizer state)."""
        from deepflow.finetune.train import KEEP_CHECKPOINTS

        with self.db.transaction() as session:
            runs.record_checkpoint(
                session,
                self.job_id,
                self.tenant_id,
                step=step,
                path=str(path),
                train_loss=loss,
                valid_loss=valid_loss,
            )
            row = session.get(TrainingStep, (self.job_id, step))
            if row is not None:
                row.valid_loss = valid_loss
            stale = runs.prune_checkpoints(session, self.job_id, KEEP_CHECKPOINTS)
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)

    def paused(self) -> bool:
        with self.db.transaction() as session:
            return runs.is_paused(session, self.job_id)


def _train(args: dict[str, Any]) -> dict[str, Any]:
    """Train to the last step, from the job's last checkpoint if an earlier attempt died."""
    from deepflow.finetune.train import train as run_training

    spec, context = args["job"], args["context"]
    job_id, tenant_id = context["job_id"], context["tenant_id"]
    base = _validated(args)["base"]["uri"]
    folder = job_folder(job_id)
    train_set, valid_set = data.load(folder / "examples.json")
    db = _db()
    with db.transaction() as session:
        checkpoint = runs.resume_from(session, job_id)
        resume = Path(checkpoint.path) if checkpoint is not None else None
    if resume is not None and not resume.is_dir():
        raise OperatorFailed(f"checkpoint {resume} is recorded but missing on this machine")
    plan = _plan(spec, base)
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    run_training(
        plan,
        train_set,
        valid_set,
        folder / "checkpoints",
        _StoreProgress(db, job_id, tenant_id),
        resume=resume,
    )
    with db.transaction() as session:
        last = runs.latest_checkpoint(session, job_id)
        assert last is not None  # the loop ends with one
        return {"checkpoint": last.path, "step": last.step, "train_loss": last.train_loss}


def _validated(args: dict[str, Any]) -> dict[str, Any]:
    """validate_data's output, which every later task reads from the job's first task."""
    with _db().transaction() as session:
        output = session.execute(
            select(Task.output).where(
                Task.job_id == args["context"]["job_id"], Task.name == "validate_data"
            )
        ).scalar_one()
    return output  # type: ignore[no-any-return]


def _trained_model(spec: dict[str, Any], base: str, checkpoint: Path) -> Any:
    from deepflow.finetune.train import load_model, load_trainable

    lora = spec["method"]["supervised"].get("lora")
    model = load_model(Path(base), lora, spec["seed"], _device(spec))
    load_trainable(model, checkpoint)
    return model


def _samples(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]]) -> list:
    import torch

    out = []
    model.eval()
    for messages in conversations[:SAMPLE_PROMPTS]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:last]
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=model.device)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=SAMPLE_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_ids,
                pad_token_id=tokenizer.eos_token_ids[0],
            )
        answer = tokenizer.decode(generated[0, ids.shape[1] :].tolist())
        out.append({"prompt": prompt[-1]["content"], "completion": answer})
    return out


def _evaluate(args: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss of the base model and of the trained one, and a few greedy answers."""
    from deepflow.finetune.train import load_model, mean_loss

    spec, context = args["job"], args["context"]
    checked = _validated(args)
    base = checked["base"]["uri"]
    _, valid_set = data.load(job_folder(context["job_id"]) / "examples.json")
    batch = spec["method"]["supervised"]["hyperparameters"]["batch_size"]
    base_model = load_model(Path(base), None, spec["seed"], _device(spec))
    base_loss = mean_loss(base_model, valid_set, batch)
    del base_model
    trained = _trained_model(spec, base, Path(context["upstream"]["train"]["checkpoint"]))
    valid_loss = mean_loss(trained, valid_set, batch)
    source = checked.get("validation_file") or checked["training_file"]
    conversations = [m for _, m in data.read_conversations(Path(source["path"]))]
    samples = _samples(trained, _tokenizer(base), conversations)
    for sample in samples:
        print(f"{sample['prompt']!r} -> {sample['completion']!r}", flush=True)
    return {"base_valid_loss": base_loss, "valid_loss": valid_loss, "samples": samples}


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def save_merged(spec: dict[str, Any], base: str, checkpoint: Path, folder: Path) -> None:
    """The trained weights as a whole model folder (LoRA merged into the base), written to a
    temporary name and renamed: a folder that exists is complete."""
    import torch

    model = _trained_model(spec | {"resource_class": "cpu"}, base, checkpoint)
    if spec["method"]["supervised"].get("lora"):
        model = model.merge_and_unload()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(torch.float32).save_pretrained(str(partial), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(base) / name).is_file():
            shutil.copy2(Path(base) / name, partial / name)
    partial.rename(folder)


def _register_model(args: dict[str, Any]) -> dict[str, Any]:
    """A new version of ``ft:<base>:<suffix>`` with its lineage: base, data, job, metrics."""
    spec, context = args["job"], args["context"]
    job_id, tenant_id = context["job_id"], context["tenant_id"]
    checked, scores = _validated(args), context["upstream"]["evaluate"]
    base = checked["base"]["uri"]
    name = fine_tuned_name(spec, job_id)
    folder = version_folder(Settings.from_env(), name)
    with _db().transaction() as session:
        checkpoint = runs.latest_checkpoint(session, job_id)
        assert checkpoint is not None
        step = checkpoint.step
    save_merged(spec, base, Path(checkpoint.path), folder)
    lineage = {
        "base": checked["base"],
        "training_file": {k: checked["training_file"][k] for k in ("id", "sha256")},
        "validation_file": (
            {k: checked["validation_file"][k] for k in ("id", "sha256")}
            if "validation_file" in checked
            else None
        ),
        "job_id": job_id,
        "method": spec["method"],
        "seed": spec["seed"],
        "step": step,
        "metrics": {k: scores[k] for k in ("base_valid_loss", "valid_loss")},
    }
    with _db().transaction() as session:
        version = register_model_version(session, tenant_id, name, str(folder), lineage)
        set_model_version_state(session, version.id, ModelVersionState.READY)
        number = version.version
    return {"model": name, "version": number, "uri": str(folder)}


def deploy(args: dict[str, Any]) -> dict[str, Any]:
    """One replica of the fine-tuned model; the deployments' reconciler starts its deploy job."""
    from deepflow.replicas.converge import converge

    spec, context = args["job"], args["context"]
    registered = context["upstream"]["register_model"]
    db = _db()
    with db.transaction() as session:
        try:
            deployment = create_deployment(
                session,
                context["tenant_id"],
                name=registered["model"],
                model_path=registered["uri"],
                replicas=1,
                resource_class=ResourceClass(spec["resource_class"]),
                policy=DEFAULT_POLICY,
            )
        except Conflict as exc:  # a pipeline's earlier version is serving under the name
            raise OperatorFailed(
                f"{exc}; rolling a deployment to a new version is not supported yet"
            ) from None
        deployment_id = deployment.id
    converge(db, None, deployment_id, "fine-tuned")
    return {"deployment_id": deployment_id, "model": registered["model"]}


def _promote(args: dict[str, Any]) -> dict[str, Any]:
    """A pipeline's decision: the new weights become the model's next version, and its
    deployment is moved to them (a rolling update), only when their held-out loss is lower
    than the version they were trained from (the one served)."""
    from deepflow.replicas.converge import converge

    spec, context = args["job"], args["context"]
    scores = context["upstream"]["evaluate"]
    served, trained = scores["base_valid_loss"], scores["valid_loss"]
    decision = {"base_valid_loss": served, "valid_loss": trained}
    if served is None or trained is None or not trained < served:
        print(f"not promoted: held-out loss {trained} is not below the served {served}")
        return {**decision, "promoted": False}
    checked = _validated(args)
    decision["base"] = checked["base"]
    folder = version_folder(Settings.from_env(), spec["model"])
    with _db().transaction() as session:
        checkpoint = runs.latest_checkpoint(session, context["job_id"])
        assert checkpoint is not None
    save_merged(spec, checked["base"]["uri"], Path(checkpoint.path), folder)
    lineage = {"promoted_from": checked["base"], "job_id": context["job_id"], "metrics": decision}
    db = _db()
    with db.transaction() as session:
        version = register_model_version(
            session, context["tenant_id"], spec["model"], str(folder), lineage
        )
        set_model_version_state(session, version.id, ModelVersionState.READY)
        number = version.version
        serving = _live_deployment(session, context["tenant_id"], spec["model"])
        if serving is not None:
            serving.model_path = str(folder)
    if serving is not None:
        converge(db, None, serving.id, f"promoted version {number}")
    print(f"promoted version {number}: held-out loss {trained:.4f} < {served:.4f}")
    return {
        **decision,
        "promoted": True,
        "version": number,
        "uri": str(folder),
        "deployment_id": serving.id if serving is not None else None,
    }


def _live_deployment(session: Any, tenant_id: str, name: str) -> Any:
    from deepflow.store.deployments import GONE

    for deployment in list_deployments(session, tenant_id):
        if deployment.name == name and deployment.state not in GONE:
            return deployment
    return None


REDEPLOY_POLL_S = 0.5


def redeploy(args: dict[str, Any]) -> dict[str, Any]:
    """Wait until the deployment serves the promoted version on every replica and no older
    one is live (the rolling update the promotion started)."""
    from deepflow.store import InstanceState, deployment_instances

    promoted = args["context"]["upstream"]["promote"]
    if not promoted["promoted"] or not promoted.get("deployment_id"):
        return {"rolled_out": False}
    while True:
        with _db().transaction() as session:
            live = deployment_instances(session, promoted["deployment_id"], live_only=True)
            current = [i for i in live if i.model_path == promoted["uri"]]
            ready = [i for i in current if i.state is InstanceState.READY]
            if ready and len(current) == len(live):
                return {"rolled_out": True, "instances": [i.id for i in ready]}
        time.sleep(REDEPLOY_POLL_S)


BODIES = {"train": _train, "evaluate": _evaluate, "register_model": _register_model,
          "promote": _promote}  # fmt: skip
"""The operators that run torch, by name: each runs in a new interpreter (``in_new_process``)."""


def in_new_process(name: str, args: dict[str, Any]) -> Any:
    """Run ``BODIES[name]`` in a new Python process (``deepflow.finetune.fresh``) and return
    its output. Why: an attempt process is forked from a Celery pool process that has threads
    (Prefect's clients among them), and twice in CI a training attempt forked so stalled for
    good before loading its model, its lease still renewed; a new interpreter inherits no
    lock. Its output goes to the attempt's log; a stop of the attempt's process group stops
    it too. Costs a few seconds of imports, against minutes of training."""
    with tempfile.TemporaryDirectory(prefix="deepflow-finetune-") as tmp:
        request, result = Path(tmp) / "args.json", Path(tmp) / "result.json"
        request.write_text(json.dumps(args))
        argv = [sys.executable, "-m", "deepflow.finetune.fresh", name, str(request), str(result)]
        code = subprocess.call(argv)
        outcome = json.loads(result.read_text()) if result.is_file() else {}
    if "output" in outcome:
        return outcome["output"]
    raise OperatorFailed(outcome.get("error") or f"finetune.{name} exited with status {code}")


def train(args: dict[str, Any]) -> dict[str, Any]:
    """Train to the last step, from the job's last checkpoint if an earlier attempt died."""
    return in_new_process("train", args)  # type: ignore[no-any-return]


def evaluate(args: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss of the base model and of the trained one, and a few greedy answers."""
    return in_new_process("evaluate", args)  # type: ignore[no-any-return]


def register_model(args: dict[str, Any]) -> dict[str, Any]:
    """A new version of ``ft:<base>:<suffix>`` with its lineage: base, data, job, metrics."""
    return in_new_process("register_model", args)  # type: ignore[no-any-return]


def promote(args: dict[str, Any]) -> dict[str, Any]:
    """A pipeline's decision: promote the new weights only when their held-out loss is lower
    than the served version's (see ``_promote``)."""
    return in_new_process("promote", args)  # type: ignore[no-any-return]


OPERATORS = tuple(
    Operator(f"{kind}.{run.__name__}", run, description=run.__doc__ or "", takes_context=True)
    for kind, runs_of_kind in (
        ("finetune", (validate_data, tokenize, train, evaluate, register_model, deploy)),
        ("pipeline", (promote, redeploy)),
    )
    for run in runs_of_kind
)
"""The ``finetune`` kind's operators and the ``pipeline`` kind's own (a pipeline's first four
tasks are the ``finetune.*`` ones)."""

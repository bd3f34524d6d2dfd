"""A deployment moved to a new model version rolls: replicas of the new weights start, and the
old ones are drained only once those are healthy, so clients streaming through the gateway
the whole time see no failed request; afterwards every answer comes from the new weights."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from deepflow.store import (
    Instance,
    ModelVersionState,
    ensure_tenant,
    register_model_version,
    set_model_version_state,
)
from tests.integration.conftest import Platform
from tests.replicas.conftest import MODEL, wait_deployment

pytestmark = pytest.mark.timeout(300)

PROMPT = [5, 6, 7, 8, 9]
ALWAYS = {"ignore_eos": True}


def test_a_new_version_rolls_out_with_no_failed_request(serving: Platform, tmp_path: Path) -> None:
    from deepflow.engine.testmodel import make_test_model

    r = serving.call("POST", "/v1/deployments", {"model": MODEL, "replicas": 1})
    assert r.status_code == 201, r.text
    deployment_id = r.json()["id"]
    before = wait_deployment(serving, deployment_id, "ready", ready=1)
    old = {i["id"] for i in before["instances"] if i["state"] == "ready"}
    newer = make_test_model(tmp_path / "v2", "llama", "tiny", seed=1)
    with serving.db.transaction() as s:
        version = register_model_version(s, ensure_tenant(s, "acme").id, MODEL, str(newer))
        set_model_version_state(s, version.id, ModelVersionState.READY)
        number = version.version

    client = openai.OpenAI(base_url=f"{serving.url}/v1", api_key=serving.key, max_retries=0)
    stop, failures, answers = threading.Event(), [], []

    def load() -> None:
        while not stop.is_set():
            try:
                out = client.completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=ALWAYS
                )  # type: ignore[call-overload]
                answers.append(out)
            except Exception as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        r = serving.call("PATCH", f"/v1/deployments/{deployment_id}", {"model_version": number})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 180
        while True:
            d = wait_deployment(serving, deployment_id, "ready", ready=1)
            ready = {i["id"] for i in d["instances"] if i["state"] == "ready"}
            stopped = {i["id"] for i in d["instances"] if i["state"] == "stopped"}
            if ready and not ready & old and old <= stopped:  # drained, then stopped
                break
            assert time.monotonic() < deadline, d
            time.sleep(0.3)
        time.sleep(1)  # the gateway's routes catch up (every 0.5 s)
        served_before = len(answers)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert len(answers) > served_before > 0
    latest: list[Any] = answers[served_before:]
    tokens_now = {a.choices[0].text for a in latest}
    assert len(tokens_now) == 1, tokens_now
    with serving.db.transaction() as s:
        assert {s.get(Instance, i).model_path for i in ready} == {str(newer)}  # type: ignore[union-attr]
    # The new weights answer differently from the old ones (another random seed).
    assert {a.choices[0].text for a in answers[:3]} != tokens_now

"""Schemathesis against a FlowServe daemon (the tiny test model, in this process), with its API
key and without.

The daemon does not serve its schema, so it is read with ``app.openapi()``. A model name is
drawn from the served one most of the time (``parameters`` in the config): any other is a
404 before the request reaches the engine.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from schemathesis import Case

from deepflow.engine.daemon import build_app
from tests.api.conftest import serve
from tests.fuzz.conftest import CHECKS, CONFIG, fuzz, operations

KEY = "sk-fuzz"
SERVED = {
    **CONFIG,
    "dictionaries": {"served": {"values": ["tiny"]}},
    "parameters": {
        f"{where}.model": {"dictionary": "served", "probability": 0.9} for where in ("path", "body")
    },
}


@pytest.mark.parametrize(("keyed", "max_examples"), [(True, 20), (False, 5)], ids=["key", "none"])
def test_no_operation_fails_or_breaks_its_schema(
    engine: Any, keyed: bool, max_examples: int, subtests: pytest.Subtests
) -> None:
    app = build_app(engine, "tiny", api_keys=[KEY])
    schema = schemathesis.openapi.from_dict(
        app.openapi(), config=schemathesis.Config.from_dict(SERVED)
    )
    # /drain last: draining is one-way, every request after it is a 503.
    ops = sorted(operations(schema), key=lambda op: op.path == "/drain")
    headers = {"Authorization": f"Bearer {KEY}"} if keyed else None
    with serve(app) as url:

        def send(case: Case) -> None:
            case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)

        fuzz(ops, send, max_examples, subtests)

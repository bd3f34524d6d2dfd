"""Schemathesis against the platform API and a FlowServe daemon, each behind a real server.

Each operation of an app's OpenAPI schema is one subtest: schemathesis' coverage cases
(boundary values, wrong types, missing fields, other methods), then a Hypothesis test over
``operation.as_strategy()``, valid and invalid cases mixed. Not schemathesis' pytest
integration: ``schemathesis.pytest.from_fixture`` reads ``Function._nodeid``, which pytest 9.2
removed, and ``@schema.parametrize()`` wants the schema at import, before the fixtures that
build the apps. Every response runs ``CHECKS``: no 5xx; the status, content type and body the
schema declares; OpenAI's error shape for every 4xx and 5xx.

Bounded and deterministic for CI: ``derandomize=True`` (the same cases every run), no example
database, schemathesis' ``deterministic`` generation, and the example counts each test names
(platform: 20 per operation with a key, 5 without, 30 stateful scenarios of up to 6 steps;
daemon: 20 and 5). The folder takes about 65 s on this 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import api, live_api  # noqa: F401  (fixtures, reused)
from tests.daemon.conftest import engine, tiny_model  # noqa: F401  (fixtures, reused)

ERROR_FIELDS = {"message", "type", "param", "code"}


@schemathesis.check
def openai_error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx and 5xx body is ``{"error": {"message", "type", "param", "code"}}``, which
    the official ``openai`` client reads, also where the schema checks do not look (a 405)."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"not JSON: {response.content[:200]!r}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an error object: {body}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, f"not OpenAI's error: {body}"
    assert isinstance(error["message"], str) and error["message"], f"no message: {body}"
    assert isinstance(error["type"], str), f"no type: {body}"
    assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), body
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    openai_error_shape,
]

CONFIG: dict[str, Any] = {"generation": {"deterministic": True, "database": "none"}}
"""Schemathesis' own settings (``schemathesis.Config.from_dict``) for every schema here."""


def hypothesis_settings(max_examples: int, **kwargs: Any) -> settings:
    """Deterministic and bounded. Health checks off that judge the generator, not the API:
    negative cases are drawn by filtering, and a case that waits for a model is slow."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
        **kwargs,
    )


def operations(schema: schemathesis.BaseSchema) -> list[APIOperation]:
    return [op for methods in schema.values() for op in methods.values()]


def fuzz(
    ops: Iterable[APIOperation],
    send: Callable[[Case], object],
    max_examples: int,
    subtests: pytest.Subtests,
) -> None:
    """Each operation in its own subtest (every failing one is reported): schemathesis'
    coverage cases (each field's boundaries and wrong types, missing fields, other methods),
    then ``max_examples`` fuzzed cases, valid and invalid; ``send`` sends and checks each."""
    for operation in ops:
        schema = operation.schema
        coverage = schema.iter_coverage_cases(
            operation,
            generation_modes=list(GenerationMode),
            generation_config=schema.config.generation_for(operation=operation, phase="coverage"),
        )
        modes = [operation.as_strategy(generation_mode=mode) for mode in GenerationMode]

        @hypothesis_settings(max_examples)
        @given(case=st.one_of(modes))
        def run(case: Case) -> None:
            send(case)

        with subtests.test(operation.label):
            for case in coverage:
                send(case)
            run()

"""No request can name a host's path, a command or a URL for the platform to read, run or
fetch: models are named, and only the machine's operator (the CLI) registers their folders.
Read from the app's OpenAPI document, so a field added later is checked too."""

from __future__ import annotations

import re
from typing import Any

from tests.api.conftest import Api

HOST_ACCESS = re.compile(
    r"(path|dir|folder|command|cmd|argv|script|exec|shell|url|uri|host|endpoint)s?$", re.I
)
"""Field names that would hand the caller a path, a process or a fetch on the host. A "file"
here is an upload's content or the id of one (``/v1/files``), never a path."""
OPENAI_ROUTE_NAMES = {("POST /v1/batches", "endpoint")}
"""OpenAI's own fields that match the pattern but name one of our API's routes, checked
against a fixed list at creation (``/v1/chat/completions``, ``/v1/completions``) and served
in-process, never fetched: ``tests/batches`` tests that any other is refused."""


def _properties(schema: dict[str, Any], defs: dict[str, Any], seen: set[str]) -> set[str]:
    """Every property name reachable from ``schema`` (through $ref, items, allOf/anyOf/oneOf,
    additionalProperties)."""
    if ref := schema.get("$ref"):
        name = ref.rsplit("/", 1)[-1]
        if name in seen:
            return set()
        seen.add(name)
        return _properties(defs[name], defs, seen)
    names = set(schema.get("properties", {}))
    children = list(schema.get("properties", {}).values())
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            children.append(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        children += schema.get(key, [])
    for child in children:
        names |= _properties(child, defs, seen)
    return names


def test_no_request_field_or_parameter_names_a_path_a_command_or_a_url(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    defs = doc["components"]["schemas"]
    found: dict[str, set[str]] = {}
    operations = 0
    for route, methods in doc["paths"].items():
        for method, op in methods.items():
            operations += 1
            names = {p["name"] for p in op.get("parameters", [])}
            for media in op.get("requestBody", {}).get("content", {}).values():
                names |= _properties(media.get("schema", {}), defs, set())
            where = f"{method.upper()} {route}"
            if bad := {
                n for n in names if HOST_ACCESS.search(n) and (where, n) not in OPENAI_ROUTE_NAMES
            }:
                found[where] = bad
    assert operations > 10
    assert found == {}


def test_the_check_sees_a_path_field() -> None:
    """The walk reaches a field nested under a $ref and an array (else the test above could
    pass by seeing nothing)."""
    defs = {
        "Spec": {"properties": {"items": {"type": "array", "items": {"$ref": "#/d/Item"}}}},
        "Item": {"properties": {"model_path": {"type": "string"}}},
    }
    names = _properties({"$ref": "#/d/Spec"}, defs, set())
    assert {n for n in names if HOST_ACCESS.search(n)} == {"model_path"}

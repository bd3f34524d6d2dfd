"""Uploaded files' content, kept under ``DEEPFLOW_HOME/files/<tenant>/<file id>``, and the
line-by-line check of a JSONL file against its purpose before anything is stored.

A file is written to a temporary name, flushed to disk and renamed; only then is its row
added (``store.files``), so a listed file always has its whole content. A refused file names
the first offending line, 1-based, as OpenAI's validation does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

UPLOADABLE = ("fine-tune", "batch")
"""Purposes a user uploads; ``batch_output`` files are written by the platform."""
PURPOSES = (*UPLOADABLE, "batch_output")
ROLES = ("system", "user", "assistant", "tool")
BATCH_URLS = ("/v1/chat/completions", "/v1/completions")


class InvalidFile(ValueError):
    """The file does not suit its purpose; the message names the line."""


def check(purpose: str, data: bytes) -> int:
    """The number of records in ``data``, a JSONL file for ``purpose``; InvalidFile if a line
    does not suit it (blank lines are skipped)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidFile(f"the file is not UTF-8 text (byte {exc.start})") from None
    records = 0
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidFile(f"line {number}: not JSON ({exc.msg})") from None
        except RecursionError:
            raise InvalidFile(f"line {number}: nested too deeply") from None
        if not isinstance(record, dict):
            raise InvalidFile(f"line {number}: a JSON object is expected")
        problem = _fine_tune(record) if purpose == "fine-tune" else _batch(record, number, seen)
        if problem:
            raise InvalidFile(f"line {number}: {problem}")
        records += 1
    if records == 0:
        raise InvalidFile("the file is empty")
    return records


def _fine_tune(record: dict[str, Any]) -> str | None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object"
        role = message.get("role")
        if role not in ROLES:
            return f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str) and not message.get("tool_calls"):
            return f"messages[{i}].content must be a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from"
    return None


def _batch(record: dict[str, Any], number: int, seen: dict[str, int]) -> str | None:
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' must be a non-empty string"
    if custom_id in seen:
        return f"custom_id {custom_id!r} repeats line {seen[custom_id]}"
    seen[custom_id] = number
    if record.get("method") != "POST":
        return "'method' must be POST"
    if record.get("url") not in BATCH_URLS:
        return f"'url' {record.get('url')!r} is not one of {', '.join(BATCH_URLS)}"
    body = record.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "'body' must be an object with a 'model'"
    return None


def folder(home: Path, tenant_id: str) -> Path:
    return home / "files" / tenant_id


def save(home: Path, tenant_id: str, file_id: str, data: bytes) -> str:
    """Write the content whole (temporary name, fsync, rename); returns its SHA-256."""
    where = folder(home, tenant_id)
    where.mkdir(parents=True, exist_ok=True)
    partial = where / f".{file_id}.partial"
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    partial.rename(where / file_id)
    return hashlib.sha256(data).hexdigest()


def path(home: Path, tenant_id: str, file_id: str) -> Path:
    return folder(home, tenant_id) / file_id


def remove(home: Path, tenant_id: str, file_id: str) -> None:
    path(home, tenant_id, file_id).unlink(missing_ok=True)

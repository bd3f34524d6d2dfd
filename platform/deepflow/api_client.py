"""The command line's view of a running platform: where its API is, with which key, and
calls that turn its OpenAI-shaped errors into one-line messages.

The URL and key come from ``DEEPFLOW_API_URL`` and ``DEEPFLOW_API_KEY``, else from what
``deepflow up`` left in DEEPFLOW_HOME (``up.json`` while it runs, ``api_key``): on the
machine that runs ``up``, the commands need no configuration.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from deepflow.config import Settings

UP_FILE = "up.json"
"""Written by ``deepflow up`` once its API answers, removed when it stops: its URL, its pid
and its parts' pids (what ``status`` and ``down`` read)."""
TIMEOUT_S = 30.0


class ClientError(Exception):
    """A failed call, as one line for a person."""


def read_up(settings: Settings) -> dict[str, Any] | None:
    """What the running ``deepflow up`` of this home wrote, or None if none runs."""
    path = settings.home / UP_FILE
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_up(settings: Settings, info: dict[str, Any]) -> None:
    path = settings.ensure_home() / UP_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)  # a reader sees the old file or the new one, never half of one


def remove_up(settings: Settings) -> None:
    (settings.home / UP_FILE).unlink(missing_ok=True)


@dataclass(frozen=True)
class Client:
    url: str
    key: str | None

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Client:
        settings = settings or Settings.from_env()
        up = read_up(settings) or {}
        url = os.environ.get("DEEPFLOW_API_URL") or up.get("url")
        if not url:
            raise ClientError(
                f"no DeepFlow API to talk to: set DEEPFLOW_API_URL, or start one with "
                f"`deepflow up` (none runs for {settings.home})"
            )
        key = os.environ.get("DEEPFLOW_API_KEY")
        key_file = Path(settings.home) / "api_key"
        if key is None and key_file.exists():
            key = key_file.read_text().strip()
        return cls(url.rstrip("/"), key)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a 2xx answer; any other answer or no answer is a ClientError."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        try:
            r = httpx.request(
                method, f"{self.url}{path}", headers=headers, timeout=TIMEOUT_S, **kwargs
            )
        except httpx.TransportError as exc:
            raise ClientError(
                f"cannot reach the DeepFlow API at {self.url} ({type(exc).__name__}); "
                "is `deepflow up` running?"
            ) from None
        if r.is_success:
            return r.json()
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text.strip()[:200] or r.reason_phrase
        raise ClientError(f"{r.status_code}: {message}")

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, json=body)

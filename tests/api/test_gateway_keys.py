"""The gateway's key cache: a revoked key stops working within ``KEY_TTL_S``, and a key looked
up in a slow database stalls no other request (the lookup runs off the event loop)."""

from __future__ import annotations

import threading
import time

import httpx
import psycopg
import pytest

from deepflow.gateway.table import KEY_TTL_S
from deepflow.store import create_api_key, revoke_api_key
from tests.api.conftest import Api


def test_a_revoked_key_stops_working_within_the_cache_ttl(api: Api, live_api: str) -> None:
    assert KEY_TTL_S <= 1.0
    with api.db.transaction() as s:
        _, key = create_api_key(s, "initech")
    url, auth = f"{live_api}/v1/models", {"Authorization": f"Bearer {key}"}
    assert httpx.get(url, headers=auth).status_code == 200  # now cached
    with api.db.transaction() as s:
        assert revoke_api_key(s, key)
    revoked = time.monotonic()
    while (r := httpx.get(url, headers=auth)).status_code == 200:
        assert time.monotonic() - revoked < KEY_TTL_S + 0.5, "the revoked key still works"
        time.sleep(0.05)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert api.client.get("/v1/jobs", headers=auth).status_code == 401  # the API: at once


def test_a_slow_key_lookup_stalls_no_other_request(api: Api, live_api: str) -> None:
    if not api.db.url.startswith("postgresql"):
        pytest.skip("one flavour is enough: PostgreSQL's table lock holds the lookup")
    api.client.app.state.gateway_keys.ttl_s = 60.0  # the warm key stays cached throughout
    url = f"{live_api}/v1/chat/completions"
    body = {"model": "none", "messages": [{"role": "user", "content": "hi"}]}

    def ask(key: str | None = None) -> int:
        # no such model: a 404 once the key is known, so the lookup is all the work there is
        return httpx.post(url, json=body, headers=api.headers(key), timeout=30).status_code

    assert ask() == 404  # the key cached, the routing table read
    with api.db.transaction() as s:
        _, fresh = create_api_key(s, "initech")
    slow: list[int] = []
    dsn = api.db.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")  # until rollback
        waiting = threading.Thread(target=lambda: slow.append(ask(fresh)))
        waiting.start()
        time.sleep(0.5)  # its lookup is now blocked on the lock
        start = time.monotonic()
        status = ask()
        took = time.monotonic() - start
        locker.rollback()
    waiting.join(timeout=30)
    assert status == 404 and slow == [404]
    assert took < 1.0, f"a cached key waited {took:.1f} s behind another key's lookup"

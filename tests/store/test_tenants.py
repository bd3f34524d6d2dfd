"""Tenants and API keys: keys are stored hashed and authenticate their tenant only."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from deepflow.store import ApiKey, Database, authenticate, create_api_key, ensure_tenant
from deepflow.store.types import utcnow


def test_key_is_stored_hashed_and_authenticates_its_tenant(db: Database) -> None:
    with db.transaction() as s:
        tenant, key = create_api_key(s, "acme")
        _, other_key = create_api_key(s, "other")
    assert key.startswith("df-") and len(key) > 40
    with db.transaction() as s:
        stored = s.execute(select(ApiKey).where(ApiKey.tenant_id == tenant.id)).scalar_one()
        assert key not in (stored.key_hash, stored.prefix) and len(stored.key_hash) == 64
        assert authenticate(s, key).id == tenant.id  # type: ignore[union-attr]
        assert authenticate(s, other_key).id != tenant.id  # type: ignore[union-attr]
        assert authenticate(s, key + "x") is None
        assert authenticate(s, "") is None
        stored.revoked_at = utcnow()
    with db.transaction() as s:
        assert authenticate(s, key) is None


def test_ensure_tenant_is_idempotent_and_checks_names(db: Database) -> None:
    with db.transaction() as s:
        a = ensure_tenant(s, "acme")
        b = ensure_tenant(s, " acme ")
        assert a.id == b.id
        with pytest.raises(ValueError, match="1 to 100"):
            ensure_tenant(s, "  ")

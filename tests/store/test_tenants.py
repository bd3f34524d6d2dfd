"""Tenants and API keys: keys are stored hashed and authenticate their tenant only."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from deepflow.store import (
    ApiKey,
    Database,
    KeyScope,
    authenticate,
    create_api_key,
    ensure_tenant,
    set_tenant_limits,
)
from deepflow.store.types import utcnow


def test_key_is_stored_hashed_and_authenticates_its_tenant(db: Database) -> None:
    with db.transaction() as s:
        tenant, key = create_api_key(s, "acme")
        _, other_key = create_api_key(s, "other")
    assert key.startswith("df-") and len(key) > 40
    with db.transaction() as s:
        stored = s.execute(select(ApiKey).where(ApiKey.tenant_id == tenant.id)).scalar_one()
        assert key not in (stored.key_hash, stored.prefix) and len(stored.key_hash) == 64
        assert authenticate(s, key).tenant.id == tenant.id  # type: ignore[union-attr]
        assert authenticate(s, other_key).tenant.id != tenant.id  # type: ignore[union-attr]
        assert authenticate(s, key).scope is KeyScope.ALL  # type: ignore[union-attr]
        assert authenticate(s, key + "x") is None
        assert authenticate(s, "") is None
        stored.revoked_at = utcnow()
    with db.transaction() as s:
        assert authenticate(s, key) is None


def test_a_read_only_key_grants_reads_only_and_limits_are_counts(db: Database) -> None:
    with db.transaction() as s:
        _, key = create_api_key(s, "acme", KeyScope.READ)
        grant = authenticate(s, key)
        assert grant is not None and grant.scope is KeyScope.READ
        assert grant.allows("GET") and grant.allows("head")
        assert not any(grant.allows(m) for m in ("POST", "PATCH", "PUT", "DELETE"))
        tenant = set_tenant_limits(s, "acme", requests_per_minute=60, max_instances=0)
        assert (tenant.requests_per_minute, tenant.max_instances) == (60, 0)
        assert tenant.tokens_per_minute is None  # unset: the platform's default
        with pytest.raises(ValueError, match="unknown limits: rpm"):
            set_tenant_limits(s, "acme", rpm=1)
        with pytest.raises(ValueError, match="0 or more"):
            set_tenant_limits(s, "acme", max_active_jobs=-1)


def test_ensure_tenant_is_idempotent_and_checks_names(db: Database) -> None:
    with db.transaction() as s:
        a = ensure_tenant(s, "acme")
        b = ensure_tenant(s, " acme ")
        assert a.id == b.id
        with pytest.raises(ValueError, match="1 to 100"):
            ensure_tenant(s, "  ")

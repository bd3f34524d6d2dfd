"""Tenants and their API keys.

A key is 32 random bytes shown once; the store keeps its SHA-256. A fast hash is enough
here (unlike passwords): the key has 256 bits of entropy, so there is nothing to guess.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deepflow.store.orm import ApiKey, Tenant
from deepflow.store.types import new_id, utcnow

KEY_PREFIX = "df-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.execute(select(Tenant).where(Tenant.name == name)).scalar_one_or_none()


def ensure_tenant(session: Session, name: str) -> Tenant:
    """The tenant called ``name``, created if missing (safe when two callers race)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("a tenant name must have 1 to 100 characters")
    tenant = read_tenant_by_name(session, name)
    if tenant is not None:
        return tenant
    try:
        with session.begin_nested():
            tenant = Tenant(id=new_id("tenant"), name=name)
            session.add(tenant)
    except IntegrityError:
        tenant = read_tenant_by_name(session, name)
        assert tenant is not None
    return tenant


def create_api_key(session: Session, tenant_name: str) -> tuple[Tenant, str]:
    """A new key for the tenant (created if needed). Returns the key in clear, once."""
    tenant = ensure_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(id=new_id("key"), tenant_id=tenant.id, prefix=key[:10], key_hash=hash_key(key))
    )
    session.flush()
    return tenant, key


def authenticate(session: Session, key: str) -> Tenant | None:
    """The tenant owning ``key``, or None for an unknown or revoked key."""
    stmt = (
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    return session.execute(stmt).scalar_one_or_none()


def revoke_api_key(session: Session, key: str) -> bool:
    """Revoke ``key`` (the API answers 401 to it at once; the gateway within its key cache's
    ``KEY_TTL_S``). False when no live key matches."""
    row = session.execute(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is None:
        return False
    row.revoked_at = utcnow()
    return True

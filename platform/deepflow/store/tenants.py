"""Tenants and their API keys.

A key is 32 random bytes shown once; the store keeps its SHA-256. A fast hash is enough
here (unlike passwords): the key has 256 bits of entropy, so there is nothing to guess.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from deepflow.store.orm import ApiKey, Tenant
from deepflow.store.types import new_id, utcnow

KEY_PREFIX = "df-"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LIMITS = ("requests_per_minute", "tokens_per_minute", "max_active_jobs", "max_instances")
"""A tenant's own limits (``Tenant`` columns); None: the platform's default."""


class KeyScope(StrEnum):
    ALL = "all"
    """Every route of the key's tenant."""
    READ = "read"
    """Reads only (GET): a dashboard, monitoring. As OpenAI's restricted keys, running a
    completion is not a read."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a key grants: its tenant, and whether it may change anything."""

    tenant: Tenant
    scope: KeyScope

    def allows(self, method: str) -> bool:
        return self.scope is KeyScope.ALL or method.upper() in READ_METHODS


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


def create_api_key(
    session: Session, tenant_name: str, scope: KeyScope = KeyScope.ALL
) -> tuple[Tenant, str]:
    """A new key for the tenant (created if needed). Returns the key in clear, once."""
    tenant = ensure_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=new_id("key"),
            tenant_id=tenant.id,
            prefix=key[:10],
            key_hash=hash_key(key),
            scope=scope.value,
        )
    )
    session.flush()
    return tenant, key


def authenticate(session: Session, key: str) -> Grant | None:
    """What ``key`` grants, or None for an unknown or revoked key."""
    stmt = (
        select(Tenant, ApiKey.scope)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    row = session.execute(stmt).one_or_none()
    return None if row is None else Grant(row[0], KeyScope(row[1]))


def set_tenant_limits(session: Session, tenant_name: str, **limits: int | None) -> Tenant:
    """Set the named limits of a tenant (created if needed): a count, 0 for none, or None
    for the platform's default."""
    unknown = set(limits) - set(LIMITS)
    if unknown:
        raise ValueError(f"unknown limits: {', '.join(sorted(unknown))}")
    if any(v is not None and v < 0 for v in limits.values()):
        raise ValueError("a limit is a count: 0 or more")
    tenant = ensure_tenant(session, tenant_name)
    for name, value in limits.items():
        setattr(tenant, name, value)
    return tenant


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

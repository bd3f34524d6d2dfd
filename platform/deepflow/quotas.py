"""Per-tenant rate limits and quotas, each refused with a 429 in OpenAI's shape and
``Retry-After``, and read-only keys, refused with a 403 on anything but a read.

- requests a minute (every API and gateway route) and tokens a minute (inference, estimated
  before forwarding as the gateway's ``request_cost``): token buckets in this process,
  refilled continuously and holding at most a minute's worth. Several API processes each
  allow the full rate (as a per-replica limit).
- jobs pending, queued or running at once, and engine instances asked for by all the tenant's
  deployments: counted in the store, in the transaction that would exceed them, under the
  tenant's row lock, so two requests racing cannot both take the last one.

A tenant's own limit (``deepflow tenants limits``) overrides the platform's default
(``Settings``); 0 means no limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from deepflow.config import Settings
from deepflow.dag import JobState
from deepflow.openai_errors import OpenAIError
from deepflow.store import Deployment, DeploymentState, Grant, Job, Tenant
from deepflow.store.transitions import lock

ACTIVE_JOBS = (JobState.PENDING, JobState.QUEUED, JobState.RUNNING)
INSTANCES_GONE = (DeploymentState.DELETING, DeploymentState.DELETED, DeploymentState.FAILED)
QUOTA_RETRY_AFTER_S = 5
"""Retry-After of a refusal on a count (jobs, instances): when one may have ended."""


@dataclass(frozen=True, slots=True)
class Limits:
    """One tenant's limits; 0: none."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_active_jobs: int = 0
    max_instances: int = 0

    @classmethod
    def defaults(cls, settings: Settings) -> Limits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def of(self, tenant: Tenant) -> Limits:
        """These defaults with ``tenant``'s own limits over them."""
        own = {f.name: getattr(tenant, f.name) for f in fields(self)}
        return Limits(**{k: getattr(self, k) if v is None else v for k, v in own.items()})


class Buckets:
    """Token buckets by key, each holding at most ``per_minute`` and refilled at
    ``per_minute`` a minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # routes run in threads and on the event loop
        self._levels: dict[str, tuple[float, float]] = {}

    def take(self, key: str, amount: float, per_minute: int) -> float:
        """Take ``amount``: 0.0 when taken, else the seconds until it could be (nothing is
        taken). An amount above a minute's worth needs a full bucket, not more."""
        if per_minute <= 0:
            return 0.0
        amount = min(amount, per_minute)
        with self._lock:
            now = self._clock()
            level, at = self._levels.get(key, (float(per_minute), now))
            level = min(float(per_minute), level + (now - at) * per_minute / 60)
            if level >= amount:
                self._levels[key] = (level - amount, now)
                return 0.0
            self._levels[key] = (level, now)
            return (amount - level) * 60 / per_minute


class Quotas:
    """The checks; one per API application (``app.state.quotas``)."""

    def __init__(self, defaults: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.defaults = defaults
        self._requests = Buckets(clock)
        self._tokens = Buckets(clock)

    def admit(self, grant: Grant, method: str) -> Tenant:
        """The request's tenant, if its key may make it and the tenant's request rate
        allows it now."""
        if not grant.allows(method):
            raise OpenAIError(
                403,
                f"this API key is read-only: it cannot make {method} requests",
                code="read_only_key",
            )
        tenant = grant.tenant
        per_minute = self.defaults.of(tenant).requests_per_minute
        wait = self._requests.take(tenant.id, 1, per_minute)
        if wait:
            raise _rate_limited(f"{per_minute} requests a minute", wait)
        return tenant

    def spend_tokens(self, tenant: Tenant, tokens: int) -> None:
        """Take an inference request's estimated tokens from the tenant's minute."""
        per_minute = self.defaults.of(tenant).tokens_per_minute
        wait = self._tokens.take(tenant.id, tokens, per_minute)
        if wait:
            raise _rate_limited(f"{per_minute} tokens a minute", wait)

    def check_active_jobs(self, session: Session, tenant: Tenant) -> None:
        """Call in the transaction that created a job, after creating it: refuses (and so
        rolls back) a job beyond the tenant's ``max_active_jobs``."""
        cap = self.defaults.of(tenant).max_active_jobs
        if not cap:
            return
        lock(session, Tenant, tenant.id)
        active = session.execute(
            select(func.count(Job.id)).where(Job.tenant_id == tenant.id, Job.state.in_(ACTIVE_JOBS))
        ).scalar_one()
        if active > cap:
            raise OpenAIError(
                429,
                f"this tenant may have {cap} jobs pending, queued or running at once; "
                "wait for one to finish or cancel one",
                code="active_jobs_quota_exceeded",
                retry_after_s=QUOTA_RETRY_AFTER_S,
            )

    def check_instances(self, session: Session, tenant: Tenant) -> None:
        """Call in the transaction that created or scaled a deployment, after the change:
        refuses (and so rolls back) replicas beyond the tenant's ``max_instances``."""
        cap = self.defaults.of(tenant).max_instances
        if not cap:
            return
        lock(session, Tenant, tenant.id)
        asked = session.execute(
            select(func.coalesce(func.sum(Deployment.replicas), 0)).where(
                Deployment.tenant_id == tenant.id, Deployment.state.not_in(INSTANCES_GONE)
            )
        ).scalar_one()
        if asked > cap:
            raise OpenAIError(
                429,
                f"this tenant's deployments may ask for {cap} instances in all, and this "
                f"would make {asked}",
                param="replicas",
                code="instances_quota_exceeded",
                retry_after_s=QUOTA_RETRY_AFTER_S,
            )


def _rate_limited(limit: str, wait_s: float) -> OpenAIError:
    return OpenAIError(
        429,
        f"rate limit reached: this tenant may make {limit}; try again in {wait_s:.1f} s",
        code="rate_limit_exceeded",
        retry_after_s=max(1, math.ceil(wait_s)),
    )

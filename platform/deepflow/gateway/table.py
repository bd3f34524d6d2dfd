"""What the gateway routes by, kept in memory so a request touches no database.

``RoutingTable`` re-reads ready instances every ``REFRESH_S`` in a background thread and keeps
each instance's ``Endpoint`` (its outstanding load and remembered prefixes) across reads.
``KeyCache`` remembers what an API key grants (its tenant, its scope) for ``KEY_TTL_S``: a
revoked key keeps working through the gateway for at most that long. Its lookups run in a
worker thread, so a slow database never stalls the event loop that relays every stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select

from deepflow.gateway.policies import Endpoint, Policy, make_policy
from deepflow.store import (
    Database,
    Deployment,
    DeploymentState,
    Grant,
    Instance,
    InstanceState,
    authenticate,
)

log = logging.getLogger(__name__)

REFRESH_S = 0.5
KEY_TTL_S = 1.0
SERVING = (DeploymentState.CREATING, DeploymentState.READY, DeploymentState.DEGRADED)


@dataclass
class Route:
    deployment_id: str
    policy: Policy
    endpoints: list[Endpoint] = field(default_factory=list)

    def live(self, now: float) -> list[Endpoint]:
        return [e for e in self.endpoints if e.down_until <= now]


class RoutingTable:
    def __init__(self, db: Database, refresh_s: float = REFRESH_S) -> None:
        self.db = db
        self.refresh_s = refresh_s
        self._routes: dict[tuple[str, str], Route] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._started = False
        self._lock = threading.Lock()

    def route(self, tenant_id: str, model: str) -> Route | None:
        self._ensure_started()
        return self._routes.get((tenant_id, model))

    def models(self, tenant_id: str) -> list[tuple[str, str]]:
        """(model name, deployment id) of the tenant's serving deployments."""
        self._ensure_started()
        return sorted((m, r.deployment_id) for (t, m), r in self._routes.items() if t == tenant_id)

    async def start(self) -> None:
        """Read the table for the first time off the event loop (later reads are the
        refresh thread's)."""
        if not self._started:
            await asyncio.to_thread(self._ensure_started)

    def _ensure_started(self) -> None:
        if self._started:
            return
        with self._lock:
            if not self._started:
                self.refresh()
                threading.Thread(target=self._loop, name="gateway-routes", daemon=True).start()
                self._started = True

    def _loop(self) -> None:
        while True:
            time.sleep(self.refresh_s)
            try:
                self.refresh()
            except Exception:  # keep routing on the last good table
                log.exception("refreshing the routing table failed")

    def refresh(self) -> None:
        with self.db.transaction() as session:
            deployments = session.execute(
                select(
                    Deployment.id, Deployment.tenant_id, Deployment.name, Deployment.policy
                ).where(Deployment.state.in_(SERVING))
            ).all()
            instances = session.execute(
                select(Instance.id, Instance.deployment_id, Instance.address).where(
                    Instance.state == InstanceState.READY, Instance.address.is_not(None)
                )
            ).all()
        by_deployment: dict[str, list[Endpoint]] = {}
        endpoints: dict[str, Endpoint] = {}
        for instance_id, deployment_id, address in instances:
            endpoint = self._endpoints.get(instance_id) or Endpoint(instance_id, address)
            endpoints[instance_id] = endpoint
            by_deployment.setdefault(deployment_id, []).append(endpoint)
        routes: dict[tuple[str, str], Route] = {}
        for deployment_id, tenant_id, name, policy in deployments:
            known = self._routes.get((tenant_id, name))
            keep = known is not None and known.deployment_id == deployment_id
            route = known if keep and known.policy.name == policy else None
            route = route or Route(deployment_id, make_policy(policy))
            route.endpoints = by_deployment.get(deployment_id, [])
            routes[(tenant_id, name)] = route
        self._endpoints, self._routes = endpoints, routes


class KeyCache:
    def __init__(self, db: Database, ttl_s: float = KEY_TTL_S) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[Grant | None, float]] = {}

    async def grant(self, key: str) -> Grant | None:
        now = time.monotonic()
        hit = self._known.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        grant = await asyncio.to_thread(self._lookup, key)
        if len(self._known) > 10_000:
            self._known.clear()
        self._known[key] = (grant, now + self.ttl_s)
        return grant

    def _lookup(self, key: str) -> Grant | None:
        with self.db.transaction() as session:
            grant = authenticate(session, key)
            if grant is not None:
                session.expunge(grant.tenant)
        return grant

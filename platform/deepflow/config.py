"""Platform settings: one object read from ``DEEPFLOW_*`` environment variables.

Everything has an embedded default under ``DEEPFLOW_HOME`` (``~/.deepflow``), so one machine
runs the whole platform with no servers installed: SQLite for the store and kombu's
``filesystem://`` transport for the broker. Production points the same variables at
PostgreSQL and Redis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None


def _env_count(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name) or str(default)
    if not raw.isdigit() or int(raw) < minimum:
        what = "a positive" if minimum else "a"
        raise ValueError(f"{name} must be {what} whole number, not {raw!r}")
    return int(raw)


def _env_port(name: str) -> int | None:
    """The port set in ``name``; None where it is unset."""
    raw = os.environ.get(name)
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{name} must be a port number, not {raw!r}")
    return int(raw)


def normalize_database_url(url: str) -> str:
    """Pin PostgreSQL URLs to psycopg 3 (SQLAlchemy's bare ``postgresql://`` means psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(slots=True, frozen=True)
class Settings:
    home: Path
    database_url: str
    broker_url: str
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    prefect_api_url: str | None = None
    """An existing Prefect server's API (DEEPFLOW_PREFECT_API_URL); ``up`` starts one if unset."""
    prefect_database_url: str | None = None
    """The database of the Prefect server ``up`` starts (DEEPFLOW_PREFECT_DATABASE_URL). None:
    a database of its own beside ours (``prefect_database``)."""
    prefect_port: int | None = None
    """Where ``up`` starts its Prefect server (DEEPFLOW_PREFECT_PORT); ``up`` stops if it is
    taken. None: Prefect's 4200, or the first free port after it (``claims``)."""
    lease_ttl_s: float = 30.0
    """A running task's lease lasts this long past its last heartbeat."""
    reconcile_interval_s: float = 5.0
    """How often the reconciler looks for expired leases."""
    driver_ttl_s: float = 30.0
    """A job whose driver (its flow run) has not passed for this long is handed to a new
    flow run (DEEPFLOW_DRIVER_TTL_S): its process died."""
    operator_modules: str = ""
    """Comma-separated operator modules to load besides the installed plugins (the
    ``deepflow.operators`` entry points): a development override (DEEPFLOW_OPERATORS)."""
    instance_host: str = "127.0.0.1"
    """The address engine daemons launched on this machine listen on and are reached at
    (DEEPFLOW_INSTANCE_HOST): loopback for one machine, the host's address for several."""
    max_body_bytes: int = 8 * 2**20
    """The largest request body the API takes (DEEPFLOW_MAX_BODY_BYTES); larger is a 413."""
    max_job_tasks: int = 10_000
    """The most tasks one job may have (DEEPFLOW_MAX_JOB_TASKS); more is a 400."""
    max_spec_bytes: int = 2 * 2**20
    """The largest job spec, as JSON (DEEPFLOW_MAX_SPEC_BYTES); larger is a 413: a job's spec
    is stored and sent back with it."""
    requests_per_minute: int = 0
    """API and gateway requests a tenant may make a minute (DEEPFLOW_REQUESTS_PER_MINUTE);
    more get 429 with Retry-After. 0: no limit. A tenant's own limit overrides it."""
    tokens_per_minute: int = 0
    """Prompt and completion tokens (estimated before forwarding) a tenant's inference may
    use a minute (DEEPFLOW_TOKENS_PER_MINUTE). 0: no limit."""
    max_active_jobs: int = 0
    """Jobs a tenant may have pending, queued or running at once (DEEPFLOW_MAX_ACTIVE_JOBS).
    0: no limit."""
    max_instances: int = 0
    """Engine instances a tenant's deployments may ask for in all (DEEPFLOW_MAX_INSTANCES).
    0: no limit."""

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("DEEPFLOW_HOME") or Path.home() / ".deepflow").expanduser()
        database_url = (
            os.environ.get("DEEPFLOW_DATABASE_URL") or f"sqlite:///{home / 'deepflow.db'}"
        )
        broker_url = os.environ.get("DEEPFLOW_BROKER_URL") or "filesystem://"
        port = _env_port("DEEPFLOW_API_PORT") or 8000
        return cls(
            home=home,
            database_url=normalize_database_url(database_url),
            broker_url=broker_url,
            api_host=os.environ.get("DEEPFLOW_API_HOST", "127.0.0.1"),
            api_port=port,
            prefect_port=_env_port("DEEPFLOW_PREFECT_PORT"),
            prefect_api_url=os.environ.get("DEEPFLOW_PREFECT_API_URL") or None,
            prefect_database_url=os.environ.get("DEEPFLOW_PREFECT_DATABASE_URL") or None,
            lease_ttl_s=_env_float("DEEPFLOW_LEASE_TTL_S", 30.0),
            reconcile_interval_s=_env_float("DEEPFLOW_RECONCILE_INTERVAL_S", 5.0),
            driver_ttl_s=_env_float("DEEPFLOW_DRIVER_TTL_S", 30.0),
            operator_modules=os.environ.get("DEEPFLOW_OPERATORS", ""),
            instance_host=os.environ.get("DEEPFLOW_INSTANCE_HOST", "127.0.0.1"),
            max_body_bytes=_env_count("DEEPFLOW_MAX_BODY_BYTES", 8 * 2**20),
            max_job_tasks=_env_count("DEEPFLOW_MAX_JOB_TASKS", 10_000),
            max_spec_bytes=_env_count("DEEPFLOW_MAX_SPEC_BYTES", 2 * 2**20),
            requests_per_minute=_env_count("DEEPFLOW_REQUESTS_PER_MINUTE", 0, minimum=0),
            tokens_per_minute=_env_count("DEEPFLOW_TOKENS_PER_MINUTE", 0, minimum=0),
            max_active_jobs=_env_count("DEEPFLOW_MAX_ACTIVE_JOBS", 0, minimum=0),
            max_instances=_env_count("DEEPFLOW_MAX_INSTANCES", 0, minimum=0),
        )

    def to_env(self) -> dict[str, str]:
        """These settings as the environment variables ``from_env`` reads, for children."""
        env = {
            "DEEPFLOW_HOME": str(self.home),
            "DEEPFLOW_DATABASE_URL": self.database_url,
            "DEEPFLOW_BROKER_URL": self.broker_url,
            "DEEPFLOW_API_HOST": self.api_host,
            "DEEPFLOW_API_PORT": str(self.api_port),
            "DEEPFLOW_LEASE_TTL_S": str(self.lease_ttl_s),
            "DEEPFLOW_RECONCILE_INTERVAL_S": str(self.reconcile_interval_s),
            "DEEPFLOW_DRIVER_TTL_S": str(self.driver_ttl_s),
            "DEEPFLOW_OPERATORS": self.operator_modules,
            "DEEPFLOW_INSTANCE_HOST": self.instance_host,
            "DEEPFLOW_MAX_BODY_BYTES": str(self.max_body_bytes),
            "DEEPFLOW_MAX_JOB_TASKS": str(self.max_job_tasks),
            "DEEPFLOW_MAX_SPEC_BYTES": str(self.max_spec_bytes),
            "DEEPFLOW_REQUESTS_PER_MINUTE": str(self.requests_per_minute),
            "DEEPFLOW_TOKENS_PER_MINUTE": str(self.tokens_per_minute),
            "DEEPFLOW_MAX_ACTIVE_JOBS": str(self.max_active_jobs),
            "DEEPFLOW_MAX_INSTANCES": str(self.max_instances),
        }
        if self.prefect_api_url:
            env["DEEPFLOW_PREFECT_API_URL"] = self.prefect_api_url
        if self.prefect_database_url:
            env["DEEPFLOW_PREFECT_DATABASE_URL"] = self.prefect_database_url
        if self.prefect_port is not None:
            env["DEEPFLOW_PREFECT_PORT"] = str(self.prefect_port)
        return env

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_home(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home

"""Settings from the environment, with the defaults a laptop needs.

Every setting is an ``ABFLOW_*`` environment variable, read here and nowhere
else; the result is passed explicitly. When ``ABFLOW_KAFKA_BOOTSTRAP`` and
``ABFLOW_DATABASE_URL`` are unset, the CLI fills them in from the stack that
``abflow up`` started (``abflow.local.stack.with_local_stack``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from abflow.core.errors import Invalid


class SettingsError(Invalid):
    """A setting is missing or malformed."""


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def find_home() -> Path:
    """Where the local stack keeps its state: ``ABFLOW_HOME``, else the nearest ``.abflow`` directory
    in the working directory or one of its parents (as git finds ``.git``), else ``./.abflow``."""
    if os.environ.get("ABFLOW_HOME"):
        return Path(os.environ["ABFLOW_HOME"]).absolute()
    here = Path.cwd()
    for directory in (here, *here.parents):
        if (directory / ".abflow").is_dir():
            return directory / ".abflow"
    return here / ".abflow"


@dataclasses.dataclass(frozen=True)
class Topics:
    invocations: str = "abflow.invocations"
    conversions: str = "abflow.conversions"
    dead_letters: str = "abflow.dead-letters"
    allocations: str = "abflow.allocations"
    shadows: str = "abflow.shadows"

    @classmethod
    def from_env(cls) -> "Topics":
        return cls(
            invocations=os.environ.get("ABFLOW_TOPIC_INVOCATIONS", cls.invocations),
            conversions=os.environ.get("ABFLOW_TOPIC_CONVERSIONS", cls.conversions),
            dead_letters=os.environ.get("ABFLOW_TOPIC_DEAD_LETTERS", cls.dead_letters),
            allocations=os.environ.get("ABFLOW_TOPIC_ALLOCATIONS", cls.allocations),
            shadows=os.environ.get("ABFLOW_TOPIC_SHADOWS", cls.shadows),
        )


API_ROLES = ("serving", "read", "admin")


@dataclasses.dataclass(frozen=True)
class ApiKeys:
    """The API's credentials, a list per role so that a key can be rotated without downtime (add the
    new one, move the clients, remove the old one): ``ABFLOW_API_KEYS_SERVING``, ``…_READ`` and
    ``…_ADMIN``, comma-separated. *serving*: assign, publish events, read the current weights;
    *read*: every read; *admin*: everything."""

    serving: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> "ApiKeys":
        return cls(*(tuple(k.strip() for k in os.environ.get(f"ABFLOW_API_KEYS_{role.upper()}", "").split(",")
                           if k.strip()) for role in API_ROLES))

    @classmethod
    def from_dict(cls, data: dict) -> "ApiKeys":
        return cls(*(tuple(data.get(role) or ()) for role in API_ROLES))

    def to_dict(self) -> dict[str, list[str]]:
        return {role: list(getattr(self, role)) for role in API_ROLES}

    def as_env(self) -> dict[str, str]:
        return {f"ABFLOW_API_KEYS_{role.upper()}": ",".join(getattr(self, role)) for role in API_ROLES}

    def __bool__(self) -> bool:
        return any(getattr(self, role) for role in API_ROLES)


@dataclasses.dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str | None
    database_url: str | None
    home: Path
    topics: Topics
    partitions: int = 4
    # Stream processing
    window_seconds: int = 60
    dedup_horizon_seconds: int = 15 * 60
    max_lateness_seconds: int = 7 * 24 * 3600
    max_future_seconds: int = 5 * 60
    max_event_bytes: int = 64 * 1024
    batch_max_events: int = 10_000
    batch_max_seconds: float = 0.2
    sink_connections: int = 2  # lanes a batch's partitions are applied in at once (stream_jobs.sink)
    consumer_group: str = "abflow-aggregator"
    kafka_session_timeout_seconds: float = 10.0
    kafka_commit_interval_seconds: float = 1.0
    api_keys: ApiKeys = ApiKeys()
    metrics_public: bool = True  # /metrics without a key; false: the read role
    worker_metrics_port: int = 0  # the worker's own /metrics; 0: not served
    api_max_body_bytes: int = 256 * 1024
    exposure_wait_seconds: int = 3600  # how long an outcome waits for its unit's exposure
    # Retention in days (0: for ever) of the per-minute windows, the allocation history and the
    # dead-letter counters (storage.retention).
    retention_windows_days: float = 30.0
    retention_allocations_days: float = 90.0
    retention_dead_letters_days: float = 30.0

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            kafka_bootstrap=os.environ.get("ABFLOW_KAFKA_BOOTSTRAP") or None,
            database_url=os.environ.get("ABFLOW_DATABASE_URL") or None,
            home=find_home(),
            topics=Topics.from_env(),
            partitions=_env_int("ABFLOW_PARTITIONS", 4, minimum=1),
            window_seconds=_env_int("ABFLOW_WINDOW_SECONDS", 60, minimum=1),
            dedup_horizon_seconds=_env_int("ABFLOW_DEDUP_HORIZON_SECONDS", 15 * 60, minimum=15 * 60),
            max_lateness_seconds=_env_int("ABFLOW_MAX_LATENESS_SECONDS", 7 * 24 * 3600, minimum=1),
            max_future_seconds=_env_int("ABFLOW_MAX_FUTURE_SECONDS", 5 * 60, minimum=0),
            max_event_bytes=_env_int("ABFLOW_MAX_EVENT_BYTES", 64 * 1024, minimum=256),
            batch_max_events=_env_int("ABFLOW_BATCH_MAX_EVENTS", 10_000, minimum=1),
            batch_max_seconds=_env_float("ABFLOW_BATCH_MAX_SECONDS", 0.2, minimum=0.001),
            sink_connections=_env_int("ABFLOW_SINK_CONNECTIONS", 2, minimum=1),
            consumer_group=os.environ.get("ABFLOW_CONSUMER_GROUP") or "abflow-aggregator",
            kafka_session_timeout_seconds=_env_float("ABFLOW_KAFKA_SESSION_TIMEOUT_SECONDS", 10.0, minimum=1.0),
            kafka_commit_interval_seconds=_env_float("ABFLOW_KAFKA_COMMIT_INTERVAL_SECONDS", 1.0, minimum=0.1),
            api_keys=ApiKeys.from_env(),
            metrics_public=os.environ.get("ABFLOW_METRICS_PUBLIC", "1").strip().lower() not in ("0", "false", "no"),
            worker_metrics_port=_env_int("ABFLOW_WORKER_METRICS_PORT", 0, minimum=0),
            api_max_body_bytes=_env_int("ABFLOW_API_MAX_BODY_BYTES", 256 * 1024, minimum=1024),
            exposure_wait_seconds=_env_int("ABFLOW_EXPOSURE_WAIT_SECONDS", 3600, minimum=1),
            retention_windows_days=_env_float("ABFLOW_RETENTION_WINDOWS_DAYS", 30.0),
            retention_allocations_days=_env_float("ABFLOW_RETENTION_ALLOCATIONS_DAYS", 90.0),
            retention_dead_letters_days=_env_float("ABFLOW_RETENTION_DEAD_LETTERS_DAYS", 30.0),
        )

    @property
    def sqlalchemy_url(self) -> str:
        return sqlalchemy_url(self.require_database_url())

    @property
    def libpq_url(self) -> str:
        return libpq_url(self.require_database_url())

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SettingsError("ABFLOW_DATABASE_URL is not set and no local stack is running")
        return self.database_url

    def require_kafka_bootstrap(self) -> str:
        if not self.kafka_bootstrap:
            raise SettingsError("ABFLOW_KAFKA_BOOTSTRAP is not set and no local stack is running")
        return self.kafka_bootstrap


def sqlalchemy_url(url: str) -> str:
    """The SQLAlchemy form of a PostgreSQL URL, always with the psycopg 3 driver."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise SettingsError(f"ABFLOW_DATABASE_URL must be a postgresql:// URL, got {url!r}")


def libpq_url(url: str) -> str:
    """The libpq form of a PostgreSQL URL (what psycopg.connect takes)."""
    return "postgresql://" + sqlalchemy_url(url)[len("postgresql+psycopg://"):]

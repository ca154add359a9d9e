"""What route handlers share, as FastAPI dependencies over ``app.state``."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from sqlalchemy import Engine

from abflow.settings import API_ROLES, ApiKeys, Settings
from bandit_service.api.metrics import ApiMetrics
from producers.publisher import Publisher
from storage.models import Experiment
from storage.registry import get_experiment


@dataclass
class ApiState:
    settings: Settings
    keys: ApiKeys
    metrics: ApiMetrics
    pool: ConnectionPool  # psycopg, autocommit: weights, rollout status, health
    assign_pool: AsyncConnectionPool  # the same, asynchronous: `assign`, the hottest path
    engine: Engine  # SQLAlchemy: the registry and the reports
    publisher: Publisher
    # Each experiment's variants when last read: events are accepted while PostgreSQL is down.
    known_variants: dict[str, frozenset[str]] = field(default_factory=dict)
    pools_checked_at: float = 0.0  # monotonic time the pools last checked their connections (errors)


# The dependencies that do no I/O are coroutines: FastAPI runs a plain function in a worker thread,
# and each such hop costs the request latency under load.
async def api_state(request: Request) -> ApiState:
    return request.app.state.abflow


State = Annotated[ApiState, Depends(api_state)]


def role_of(keys: ApiKeys, key: str) -> str | None:
    """The role whose list holds ``key``; every key is compared, in constant time, whatever matches."""
    found = None
    presented = key.encode()
    for role in API_ROLES:
        for candidate in getattr(keys, role):
            if hmac.compare_digest(presented, candidate.encode()):
                found = role
    return found


def requires(*roles: str) -> list:
    """The dependency of a route that the keys of ``roles`` (and admin keys) may call: 401 without a
    known key, 403 with a key of another role."""
    allowed = set(roles) | {"admin"}

    async def check(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
        authorize(state, authorization, allowed)

    return [Depends(check)]


def authorize(state: ApiState, authorization: str | None, allowed: set[str]) -> None:
    if authorization is None or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing API key (Authorization: Bearer <key>)", headers={"WWW-Authenticate": "Bearer"})
    role = role_of(state.keys, authorization[len("Bearer "):])
    if role is None:
        raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    if role not in allowed:
        raise HTTPException(403, f"a {role} key may not do this; it needs a key of role "
                                 f"{' or '.join(r for r in API_ROLES if r in allowed)}")


async def metrics_access(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    """/metrics is open unless ABFLOW_METRICS_PUBLIC=0 puts it behind the read role."""
    if not state.settings.metrics_public:
        authorize(state, authorization, {"read", "admin"})


SERVING = requires("serving")  # assign and publish events
WEIGHTS = requires("serving", "read")  # the current weights: what a serving process reads
READ = requires("read")
ADMIN = requires()


def experiment(experiment_id: str, state: State) -> Experiment:
    """The experiment the path names; ``ExperimentNotFound`` (404) when there is none."""
    return get_experiment(state.engine, experiment_id)


ExistingExperiment = Annotated[Experiment, Depends(experiment)]

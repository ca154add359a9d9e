"""What route handlers share, as FastAPI dependencies over ``app.state``."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from psycopg_pool import ConnectionPool
from sqlalchemy import Engine

from abflow.settings import Settings
from bandit_service.api.metrics import ApiMetrics
from producers.publisher import Publisher
from storage.models import Experiment
from storage.registry import get_experiment


@dataclass
class ApiState:
    settings: Settings
    token: str
    metrics: ApiMetrics
    pool: ConnectionPool  # psycopg, autocommit: the hot paths (assign, weights, health)
    engine: Engine  # SQLAlchemy: the registry and the reports
    publisher: Publisher


def api_state(request: Request) -> ApiState:
    return request.app.state.abflow


State = Annotated[ApiState, Depends(api_state)]


def require_token(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    if authorization is None or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(authorization[len("Bearer "):].encode(), state.token.encode()):
        raise HTTPException(403, "wrong token")


AUTHORISED = [Depends(require_token)]


def experiment(experiment_id: str, state: State) -> Experiment:
    """The experiment the path names; ``ExperimentNotFound`` (404) when there is none."""
    return get_experiment(state.engine, experiment_id)


ExistingExperiment = Annotated[Experiment, Depends(experiment)]

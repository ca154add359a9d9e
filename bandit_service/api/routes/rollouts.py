"""A progressive rollout's status, and the operator's actions on it."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from abflow.core.text import json_safe
from bandit_service.api.deps import ADMIN, READ, ExistingExperiment, State
from bandit_service.api.models import CONFLICT, ERRORS, NOT_FOUND, RolloutAction, RolloutStatusOut
from bandit_service.rollouts import controller

router = APIRouter(prefix="/experiments", tags=["rollouts"], responses={**NOT_FOUND, **ERRORS})


@router.get("/{experiment_id}/rollout", dependencies=READ)
def rollout_status(experiment: ExistingExperiment, state: State) -> RolloutStatusOut:
    """The rollout's state, stage, weights, newest check and transitions (as `abflow rollout status --json`)."""
    with state.pool.connection() as conn:
        return RolloutStatusOut.model_validate(json_safe(controller.status(conn, experiment.experiment_id)))


@router.post("/{experiment_id}/rollout/{action}", dependencies=ADMIN, responses=CONFLICT)
def rollout_action(experiment: ExistingExperiment, action: Literal["pause", "resume", "promote", "abort"],
                   state: State, body: RolloutAction | None = None) -> RolloutStatusOut:
    """pause, resume, promote or abort; 409 when the rollout's state does not allow it."""
    with state.pool.connection() as conn:
        status = controller.operate(conn, experiment.experiment_id, action, "api", body.reason if body else None)
    return RolloutStatusOut.model_validate(json_safe(status))

"""Experiments: create, list, show, pause/resume/stop, statistics, report, weights, promotion."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from abflow.core.config import parse_config
from abflow.core.text import json_safe
from bandit_service.api.deps import ADMIN, READ, WEIGHTS, ExistingExperiment, State
from bandit_service.api.models import (
    CONFLICT,
    ERRORS,
    NOT_FOUND,
    AllocationOut,
    ChampionOut,
    ExperimentConfigIn,
    ExperimentOut,
    PromoteOut,
    PromoteRequest,
    ReportOut,
    StatsOut,
    WeightsOut,
)
from bandit_service.assignment import current_weights
from bandit_service.lifecycle import champion_history, change_status, promote
from bandit_service.report.build import build_report
from bandit_service.report.load import load_report_input
from storage.models import Experiment
from storage.queries import allocation_history, variant_totals
from storage.registry import create_experiment, get_experiment, list_experiments

router = APIRouter(prefix="/experiments", tags=["experiments"], responses={**NOT_FOUND, **ERRORS})


def describe(e: Experiment) -> ExperimentOut:
    return ExperimentOut.model_validate({
        "experiment_id": e.experiment_id, "strategy": e.strategy, "status": e.status, "epsilon": e.epsilon,
        "warmup": e.warmup, "unit": e.unit, "min_weight": e.min_weight, "reward_model": e.reward_model,
        "created_at": e.created_at.isoformat(), "lineage": e.lineage, "version": e.version, "winner": e.winner,
        "layer": {"name": e.layer, "buckets": [e.layer_start, e.layer_end]},
        "variants": [{"name": v.name, "role": v.role, "initial_weight": v.initial_weight,
                      "model_version": v.model_version} for v in e.variants]})


@router.post("", status_code=201, dependencies=ADMIN, responses=CONFLICT)
def create(body: ExperimentConfigIn, state: State) -> ExperimentOut:
    """Register an experiment; 422 names the field that breaks a rule, 409 when the id or layer share is taken."""
    config = parse_config(body.as_config_data())
    create_experiment(state.engine, config)
    return describe(get_experiment(state.engine, config.experiment_id))


@router.get("", dependencies=READ)
def experiments(state: State) -> list[ExperimentOut]:
    return [describe(e) for e in list_experiments(state.engine)]


@router.get("/{experiment_id}", dependencies=READ)
def show(experiment: ExistingExperiment) -> ExperimentOut:
    return describe(experiment)


def _status_route(action: str, summary: str) -> None:
    @router.post(f"/{{experiment_id}}/{action}", dependencies=ADMIN, responses=CONFLICT,
                 summary=summary, name=action)
    def change(experiment_id: str, state: State) -> ExperimentOut:
        return describe(change_status(state.engine, state.publisher, state.settings.topics.allocations,
                                      experiment_id, action))


_status_route("pause", "Pause: assigned units keep their variant, new units get the champion")
_status_route("resume", "Resume a paused experiment")
_status_route("stop", "Stop: everyone gets the champion (or the promoted winner)")


@router.get("/{experiment_id}/stats", dependencies=READ)
def experiment_stats(experiment: ExistingExperiment, state: State) -> StatsOut:
    """Totals per variant with their per-invocation rates."""
    totals = {row["variant"]: row for row in variant_totals(state.engine, experiment.experiment_id)}
    variants = []
    for v in experiment.variants:
        t = totals.get(v.name)
        figures = {"invocations": 0, "conversions": 0, "conversion_rate": None, "reward_sum": 0.0,
                   "reward_per_invocation": None, "errors": 0, "error_rate": None}
        if t is not None:
            figures = {key: t[key] for key in figures}
        variants.append({"variant": v.name, "role": v.role, **figures})
    return StatsOut.model_validate({"experiment_id": experiment.experiment_id, "strategy": experiment.strategy,
                                    "status": experiment.status, "variants": variants})


@router.get("/{experiment_id}/report", dependencies=READ)
def report(experiment: ExistingExperiment, state: State) -> ReportOut:
    """The same report as `abflow report --json`: decision, comparisons, guardrails, SRM, Bayesian view."""
    return ReportOut.model_validate(build_report(load_report_input(state.engine, experiment.experiment_id)))


@router.get("/{experiment_id}/weights", dependencies=WEIGHTS)
def weights(experiment: ExistingExperiment, state: State) -> WeightsOut:
    with state.pool.connection() as conn:
        current, version = current_weights(conn, experiment.experiment_id)
    return WeightsOut(experiment_id=experiment.experiment_id, version=version, weights=current)


@router.get("/{experiment_id}/weights/history", dependencies=READ)
def weights_history(experiment: ExistingExperiment, state: State,
                    limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> list[AllocationOut]:
    """The newest ``limit`` allocation versions, newest first."""
    return [AllocationOut.model_validate({**row, "computed_at": row["computed_at"].isoformat()})
            for row in allocation_history(state.engine, experiment.experiment_id, limit)]


@router.post("/{experiment_id}/promote", dependencies=ADMIN, responses=CONFLICT)
def promote_champion(experiment_id: str, body: PromoteRequest, state: State) -> PromoteOut:
    """Make a winning challenger the champion (as `abflow experiment promote`); 409 without evidence."""
    result = promote(state.engine, state.publisher, state.settings.topics.allocations, experiment_id,
                     body.variant, body.challengers, "api", body.reason, body.force, body.rollout)
    return PromoteOut.model_validate(json_safe(result))


@router.get("/{experiment_id}/champions", dependencies=READ)
def champions(experiment: ExistingExperiment, state: State) -> list[ChampionOut]:
    """The champions of the experiment's lineage, first to newest."""
    return [ChampionOut.model_validate(c) for c in champion_history(state.engine, experiment.lineage)]

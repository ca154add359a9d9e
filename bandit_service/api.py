"""The HTTP API (FastAPI): experiments, assignment, events, statistics, weights, health and metrics.

Every endpoint that changes state (creating or changing an experiment,
assigning a unit, publishing an event) requires ``Authorization: Bearer
<token>``; reads are open. Bad requests get a 4xx whose body names the field
and the problem; an unknown experiment is 404.
"""

from __future__ import annotations

import hmac
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field
from sqlalchemy import text

from abflow.settings import Settings
from abflow.text import json_safe
from bandit_service import rollout_controller
from bandit_service.assignment import ExperimentUnavailable, assign, current_weights
from bandit_service.lifecycle import PromotionRefused, champion_history, promote
from bandit_service.report import build_report, load_report_input
from bandit_service.rollout import TransitionRefused
from producers.contracts import CONVERSION, INVOCATION, InvalidEvent, event_from_dict
from producers.publisher import Publisher
from storage.db import make_engine
from storage.experiment_config import ConfigError, parse_config
from storage.queries import allocation_history, variant_totals
from storage.registry import ExperimentExists, ExperimentNotFound, LayerFull, create_experiment, get_experiment, list_experiments

STATUS_CHANGES = {"pause": ("running", "paused"), "resume": ("paused", "running"), "stop": (None, "stopped")}


class AssignRequest(BaseModel):
    unit_id: str = Field(min_length=1, max_length=256, description="The user id, or the session id for session experiments")


class AssignResponse(BaseModel):
    experiment_id: str
    unit_id: str
    variant: str
    propensity: float
    allocation_version: int | None
    new: bool
    in_experiment: bool = Field(description="False when the unit is outside the experiment's share of its layer: "
                                            "serve the variant, but log no events for it")


class PromoteRequest(BaseModel):
    variant: str = Field(description="The challenger that won")
    challengers: dict[str, str | None] = Field(default_factory=dict,
                                               description="New challengers of the next version: name → model version")
    reason: str | None = None
    force: bool = Field(False, description="Promote without a completed rollout or a SHIP decision")


class InvocationRequest(BaseModel):
    variant: str
    user_id: str
    event_id: str | None = Field(None, description="Generated when absent; send one to make retries idempotent")
    timestamp: float | str | None = Field(None, description="RFC 3339 or epoch seconds; now when absent")
    propensity: float | None = None
    latency_ms: float | None = None
    error: bool = False
    model_version: str | None = None


class ConversionRequest(BaseModel):
    variant: str
    user_id: str
    event_id: str | None = None
    timestamp: float | str | None = None
    reward: float = 1.0
    invocation_id: str | None = None


class RolloutAction(BaseModel):
    reason: str | None = None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("abflow_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("abflow_http_request_seconds", "HTTP request latency", ["route"],
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=self.registry)
        self.assignments = Counter("abflow_assignments", "Assignments served", ["experiment_id", "variant", "new"],
                                   registry=self.registry)
        self.refresh_lag = Gauge("abflow_refresh_lag_seconds",
                                 "Newest aggregate update minus newest weights computation, per experiment",
                                 ["experiment_id"], registry=self.registry)


def create_app(settings: Settings, token: str, publisher: Publisher | None = None) -> FastAPI:
    """The API over ``settings``' PostgreSQL and Kafka; state changes need ``token``."""
    if not token:
        raise ValueError("an API token is required (ABFLOW_API_TOKEN)")
    metrics = Metrics()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["pool"] = ConnectionPool(settings.libpq_url, min_size=2, max_size=16, kwargs={"autocommit": True},
                                       open=True)
        state["engine"] = make_engine(settings.require_database_url())
        state["publisher"] = publisher or Publisher(settings.require_kafka_bootstrap(), settings.topics)
        try:
            yield
        finally:
            state["pool"].close()
            state["engine"].dispose()
            if publisher is None:
                state["publisher"].close()

    app = FastAPI(title="abflow", version="0.1.0", lifespan=lifespan,
                  description="A/B tests and multi-armed bandits between ML model variants.")

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = route.path if route is not None else "unmatched"
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - started)
        return response

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if authorization is None or not authorization.startswith("Bearer "):
            raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(authorization[len("Bearer "):].encode(), token.encode()):
            raise HTTPException(403, "wrong token")

    authorised = [Depends(require_token)]

    def experiment_or_404(experiment_id: str):
        try:
            return get_experiment(state["engine"], experiment_id)
        except ExperimentNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    def describe(e) -> dict:
        return {"experiment_id": e.experiment_id, "strategy": e.strategy, "status": e.status, "epsilon": e.epsilon,
                "warmup": e.warmup, "unit": e.unit, "min_weight": e.min_weight, "reward_model": e.reward_model,
                "created_at": e.created_at.isoformat(), "lineage": e.lineage, "version": e.version,
                "winner": e.winner, "layer": {"name": e.layer, "buckets": [e.layer_start, e.layer_end]},
                "variants": [{"name": v.name, "role": v.role, "initial_weight": v.initial_weight,
                              "model_version": v.model_version} for v in e.variants]}

    @app.get("/ping")
    def ping() -> dict:
        """No I/O at all: the floor any endpoint's latency is measured against."""
        return {}

    @app.get("/healthz")
    def healthz() -> dict:
        with state["pool"].connection() as conn:
            conn.execute("SELECT 1")
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus() -> Response:
        with state["pool"].connection() as conn:
            rows = conn.execute(
                "SELECT e.experiment_id, extract(epoch FROM (SELECT max(updated_at) FROM variant_windows w "
                "WHERE w.experiment_id = e.experiment_id) - (SELECT max(computed_at) FROM allocations a "
                "WHERE a.experiment_id = e.experiment_id)) FROM experiments e WHERE e.status = 'running'").fetchall()
        for experiment_id, lag in rows:
            metrics.refresh_lag.labels(experiment_id).set(max(float(lag), 0.0) if lag is not None else 0.0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/experiments", status_code=201, dependencies=authorised)
    def create(config: dict) -> dict:
        try:
            parsed = parse_config(config)
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            create_experiment(state["engine"], parsed)
        except (ExperimentExists, LayerFull) as exc:
            raise HTTPException(409, str(exc)) from None
        return describe(experiment_or_404(parsed.experiment_id))

    @app.get("/experiments")
    def experiments() -> list[dict]:
        return [describe(e) for e in list_experiments(state["engine"])]

    @app.get("/experiments/{experiment_id}")
    def show(experiment_id: str) -> dict:
        return describe(experiment_or_404(experiment_id))

    def change_status(experiment_id: str, action: str) -> dict:
        experiment = experiment_or_404(experiment_id)
        required, target = STATUS_CHANGES[action]
        if experiment.status == "stopped" and target != "stopped":
            raise HTTPException(409, f"experiment {experiment_id!r} is stopped; it cannot {action}")
        if required is not None and experiment.status != required:
            raise HTTPException(409, f"experiment {experiment_id!r} is {experiment.status}; {action} needs {required}")
        with state["engine"].begin() as conn:
            conn.execute(text("UPDATE experiments SET status = :s, updated_at = now() WHERE experiment_id = :e"),
                         {"s": target, "e": experiment_id})
        return describe(experiment_or_404(experiment_id))

    @app.post("/experiments/{experiment_id}/pause", dependencies=authorised)
    def pause(experiment_id: str) -> dict:
        return change_status(experiment_id, "pause")

    @app.post("/experiments/{experiment_id}/resume", dependencies=authorised)
    def resume(experiment_id: str) -> dict:
        return change_status(experiment_id, "resume")

    @app.post("/experiments/{experiment_id}/stop", dependencies=authorised)
    def stop(experiment_id: str) -> dict:
        return change_status(experiment_id, "stop")

    @app.post("/experiments/{experiment_id}/assign", response_model=AssignResponse, dependencies=authorised)
    def assign_unit(experiment_id: str, body: AssignRequest) -> AssignResponse:
        with state["pool"].connection() as conn:
            try:
                result = assign(conn, experiment_id, body.unit_id)
            except ExperimentUnavailable as exc:
                raise HTTPException(404, str(exc)) from None
        metrics.assignments.labels(experiment_id, result.variant, str(result.new).lower()).inc()
        return AssignResponse(experiment_id=experiment_id, unit_id=body.unit_id, variant=result.variant,
                              propensity=result.propensity, allocation_version=result.allocation_version,
                              new=result.new, in_experiment=result.in_experiment)

    def publish_event(experiment_id: str, kind: str, fields: dict) -> dict:
        experiment = experiment_or_404(experiment_id)
        if fields["variant"] not in {v.name for v in experiment.variants}:
            raise HTTPException(422, {"field": "variant", "reason": "unknown_variant",
                                      "message": f"experiment {experiment_id!r} has no variant {fields['variant']!r}"})
        data = {k: v for k, v in fields.items() if v is not None}
        data.setdefault("event_id", str(uuid.uuid4()))
        data.setdefault("timestamp", time.time())
        data["experiment_id"] = experiment_id
        try:
            event = event_from_dict(kind, data)
        except InvalidEvent as exc:
            raise HTTPException(422, {"reason": exc.reason, "message": exc.detail}) from None
        state["publisher"].publish(event)
        state["publisher"].poll(0)
        return {"event_id": event.event_id, "accepted": True}

    @app.post("/experiments/{experiment_id}/invocations", status_code=202, dependencies=authorised)
    def invocation(experiment_id: str, body: InvocationRequest) -> dict:
        return publish_event(experiment_id, INVOCATION, body.model_dump())

    @app.post("/experiments/{experiment_id}/conversions", status_code=202, dependencies=authorised)
    def conversion(experiment_id: str, body: ConversionRequest) -> dict:
        return publish_event(experiment_id, CONVERSION, body.model_dump())

    @app.get("/experiments/{experiment_id}/stats")
    def experiment_stats(experiment_id: str) -> dict:
        experiment = experiment_or_404(experiment_id)
        totals = {row["variant"]: row for row in variant_totals(state["engine"], experiment_id)}
        variants = []
        for v in experiment.variants:
            t = totals.get(v.name, {})
            n, conversions = t.get("invocations", 0), t.get("conversions", 0)
            reward = t.get("reward_sum", 0.0)
            variants.append({"variant": v.name, "role": v.role, "invocations": n, "conversions": conversions,
                             "conversion_rate": conversions / n if n else None, "reward_sum": reward,
                             "reward_per_invocation": reward / n if n else None, "errors": t.get("errors", 0),
                             "error_rate": t.get("errors", 0) / n if n else None})
        return {"experiment_id": experiment_id, "strategy": experiment.strategy, "status": experiment.status,
                "variants": variants}

    @app.get("/experiments/{experiment_id}/report")
    def report(experiment_id: str) -> dict:
        """The same report as `abflow report --json`: decision, comparisons, guardrails, SRM, Bayesian view."""
        experiment_or_404(experiment_id)
        return build_report(load_report_input(state["engine"], experiment_id))

    @app.get("/experiments/{experiment_id}/weights")
    def weights(experiment_id: str) -> dict:
        experiment_or_404(experiment_id)
        with state["pool"].connection() as conn:
            current, version = current_weights(conn, experiment_id)
        return {"experiment_id": experiment_id, "version": version, "weights": current}

    @app.get("/experiments/{experiment_id}/weights/history")
    def weights_history(experiment_id: str, limit: int = 100) -> list[dict]:
        experiment_or_404(experiment_id)
        if not 1 <= limit <= 10_000:
            raise HTTPException(422, "limit must be between 1 and 10000")
        return [{**row, "computed_at": row["computed_at"].isoformat()}
                for row in allocation_history(state["engine"], experiment_id, limit)]

    @app.get("/experiments/{experiment_id}/rollout")
    def rollout_status(experiment_id: str) -> dict:
        """The rollout's state, stage, weights, newest check and transitions (as `abflow rollout status --json`)."""
        experiment_or_404(experiment_id)
        with state["pool"].connection() as conn:
            try:
                return json_safe(rollout_controller.status(conn, experiment_id))
            except rollout_controller.NoRollout as exc:
                raise HTTPException(404, str(exc)) from None

    @app.post("/experiments/{experiment_id}/rollout/{action}", dependencies=authorised)
    def rollout_action(experiment_id: str, action: Literal["pause", "resume", "promote", "abort"],
                       body: RolloutAction | None = None) -> dict:
        """pause, resume, promote or abort; 409 when the rollout's state does not allow it."""
        experiment_or_404(experiment_id)
        with state["pool"].connection() as conn:
            try:
                return json_safe(rollout_controller.operate(conn, experiment_id, action, "api",
                                                            body.reason if body else None))
            except rollout_controller.NoRollout as exc:
                raise HTTPException(404, str(exc)) from None
            except TransitionRefused as exc:
                raise HTTPException(409, str(exc)) from None

    @app.post("/experiments/{experiment_id}/promote", dependencies=authorised)
    def promote_champion(experiment_id: str, body: PromoteRequest) -> dict:
        """Make a winning challenger the champion (as `abflow experiment promote`); 409 without evidence."""
        experiment_or_404(experiment_id)
        try:
            result = promote(state["engine"], state["publisher"], settings.topics.allocations, experiment_id,
                             body.variant, body.challengers, "api", body.reason, body.force)
        except (PromotionRefused, ExperimentExists, LayerFull) as exc:
            raise HTTPException(409, str(exc)) from None
        return json_safe(result)

    @app.get("/experiments/{experiment_id}/champions")
    def champions(experiment_id: str) -> list[dict]:
        """The champions of the experiment's lineage, first to newest."""
        return champion_history(state["engine"], experiment_or_404(experiment_id).lineage)

    return app

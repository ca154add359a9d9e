"""Request and response bodies of the HTTP API, so that the OpenAPI schema describes every one.

The experiment config model checks shapes and types (unknown keys are refused,
types are strict); the rules between fields stay in ``abflow.core.config``,
the one place that validates a config, whichever way it arrives.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- the experiment config --------------------------------------------------------------


class VariantIn(_Strict):
    name: str
    initial_weight: float | None = Field(None, description="Default: an equal share")
    model_version: str | int | None = None
    role: Literal["champion", "challenger"] | None = Field(None, description="Default: the first is the champion")


class ShadowIn(_Strict):
    name: str
    model_version: str | int | None = None


class MetricIn(_Strict):
    name: str
    role: str
    margin: float | None = None
    kind: str | None = Field(None, description="proportion, mean or ratio: a metric of your own (absent: a built-in one)")
    numerator: str | dict[str, float] | None = Field(
        None, description="a per-unit variable, or {variable: coefficient}: invocations, conversions, reward, errors, "
                          "or a name from the events' values")
    denominator: str | dict[str, float] | None = Field(None, description="ratio metrics: as the numerator")
    direction: str | None = Field(None, description="higher (default) or lower is better")
    cap: float | None = Field(None, description="winsorize each unit's numerator at this value (mean, ratio)")
    attribution_window_seconds: int | None = Field(
        None, description="only events within this many seconds of the unit's exposure count for this metric "
                          "(default: the experiment's attribution_window_seconds, which it must not exceed)")


class AnalysisIn(_Strict):
    alpha: float | None = None
    power: float | None = None
    mde: float | None = None
    correction: str | None = None
    min_sample: int | None = None


class RolloutIn(_Strict):
    challenger: str | None = None
    stages: list[float] | None = None
    min_duration_seconds: float | None = None
    min_sample: int | None = None
    max_duration_seconds: float | None = None
    check_interval_seconds: float | None = None
    rollback_after: int | None = None
    primary_margin: float | None = None
    webhook_url: str | None = None
    confirm_url: str | None = None
    webhook_timeout_seconds: float | None = None
    webhook_retries: int | None = None


class ExperimentConfigIn(_Strict):
    """The experiment config, as in an `abflow experiment create -f FILE` file."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{
        "experiment_id": "demo", "strategy": "ThompsonSampling", "warmup": 100,
        "variants": [{"name": "Champion", "initial_weight": 1, "role": "champion", "model_version": "v1"},
                     {"name": "Challenger", "initial_weight": 1, "role": "challenger", "model_version": "v2"}]}]})

    experiment_id: str
    strategy: str
    variants: list[VariantIn]
    description: str | None = None
    epsilon: float | None = None
    warmup: int | None = None
    unit: str | None = None
    min_weight: float | None = None
    reward_model: str | None = None
    metrics: list[MetricIn] | None = None
    analysis: AnalysisIn | None = None
    rollout: RolloutIn | None = None
    layer: str | None = None
    traffic: float | None = None
    shadows: list[ShadowIn] | None = None
    attribution_window_seconds: float | None = Field(None, description="How long after a unit's exposure its "
                                                                       "events count for it; default 24 h")

    def as_config_data(self) -> dict:
        """What the user sent, as plain data for ``parse_config`` (absent keys stay absent)."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


class VariantOut(BaseModel):
    name: str
    role: str
    initial_weight: float
    model_version: str | None


class LayerOut(BaseModel):
    name: str
    buckets: list[int] = Field(description="[start, end) of the experiment's buckets in its layer")


class ExperimentOut(BaseModel):
    experiment_id: str
    strategy: str
    status: Literal["running", "paused", "stopped"]
    epsilon: float
    warmup: int
    unit: str
    min_weight: float
    reward_model: str
    created_at: str
    lineage: str
    version: int
    winner: str | None
    layer: LayerOut
    variants: list[VariantOut]


# -- serving -----------------------------------------------------------------------------


class AssignRequest(_Strict):
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


class EventAccepted(BaseModel):
    event_id: str
    accepted: bool


# -- statistics and weights ---------------------------------------------------------------


class VariantStats(BaseModel):
    variant: str
    role: str
    invocations: int
    conversions: int
    conversion_rate: float | None
    reward_sum: float
    reward_per_invocation: float | None
    errors: int
    error_rate: float | None


class StatsOut(BaseModel):
    experiment_id: str
    strategy: str
    status: str
    variants: list[VariantStats]


class WeightsOut(BaseModel):
    experiment_id: str
    version: int | None = Field(description="The allocation version; null before the first one (initial weights)")
    weights: dict[str, float]


class AllocationOut(BaseModel):
    version: int
    strategy: str
    phase: str
    weights: dict[str, float]
    statistics: dict[str, Any]
    computed_at: str


class ReportOut(BaseModel):
    """The report (as `abflow report --json`); the README's report section describes each part."""

    experiment: dict[str, Any]
    decision: dict[str, Any]
    variants: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    guardrails: list[dict[str, Any]]
    sample_ratio: dict[str, Any]
    attribution: dict[str, Any]
    bayesian: dict[str, Any] | None
    shadows: list[dict[str, Any]]
    weights_history: list[dict[str, Any]]
    series: list[dict[str, Any]]
    notes: list[str]


# -- rollouts and champions ----------------------------------------------------------------


class RolloutAction(_Strict):
    reason: str | None = None


class RolloutWeights(BaseModel):
    version: int
    phase: str
    weights: dict[str, float]


class RolloutStatusOut(BaseModel):
    experiment_id: str
    challenger: str
    stages: list[float]
    plan: dict[str, Any]
    state: str
    stage: int | None
    percent: float | None
    weights: RolloutWeights | None
    transitions: list[dict[str, Any]]
    stage_started_at: str | None = None
    deadline_at: str | None = None
    failed_checks: int | None = None
    last_check_at: str | None = None
    last_check: dict[str, Any] | None = None


class PromoteRequest(_Strict):
    variant: str = Field(description="The challenger that won")
    challengers: dict[str, str | None] = Field(default_factory=dict,
                                               description="New challengers of the next version: name → model version")
    reason: str | None = None
    force: bool = Field(False, description="Promote without a completed rollout or a SHIP decision")


class PromoteOut(BaseModel):
    experiment_id: str
    champion: str
    model_version: str | None
    lineage: str
    version: int
    allocation_version: int
    next_experiment_id: str | None
    next_variants: list[str]
    evidence: dict[str, Any]


class ChampionOut(BaseModel):
    lineage: str
    version: int
    experiment_id: str
    variant: str
    model_version: str | None
    promoted_from: str | None
    promoted_at: str
    actor: str
    reason: str | None
    evidence: dict[str, Any]


# -- errors and health ------------------------------------------------------------------


class ErrorOut(BaseModel):
    detail: str | dict[str, Any] | list[dict[str, Any]] = Field(
        description="What is wrong: a message; {reason, message, field} for events; or, for a body or parameter "
                    "of the wrong shape, one {loc, msg, type} per problem (loc is the field's path)")


class HealthOut(BaseModel):
    status: Literal["ok"]


ERRORS = {401: {"model": ErrorOut, "description": "No API key, or an unknown one"},
          403: {"model": ErrorOut, "description": "The key's role may not do this"},
          422: {"model": ErrorOut, "description": "Input that breaks a rule (not JSON, a wrong type, an unknown field, "
                                                  "a value out of range); the body names the field"}}
NOT_FOUND = {404: {"model": ErrorOut, "description": "No such experiment (or rollout)"}}
CONFLICT = {409: {"model": ErrorOut, "description": "The experiment's state refuses the change"}}

"""Request and response bodies of the HTTP API, so that the OpenAPI schema describes every one.

The experiment config model checks shapes and types (unknown keys are refused,
types are strict); the rules between fields stay in ``abflow.core.config``,
the one place that validates a config, whichever way it arrives.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _strict(*examples: dict) -> ConfigDict:
    """A request body's config: unknown keys refused, types strict, and examples for the schema."""
    return ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": list(examples)})


def _loose(*examples: dict) -> ConfigDict:
    """A response body's config: examples for the schema."""
    return ConfigDict(json_schema_extra={"examples": list(examples)})


# -- the experiment config --------------------------------------------------------------


class VariantIn(_Strict):
    model_config = _strict({"name": "Challenger", "initial_weight": 0.5, "model_version": "v2", "role": "challenger"})

    name: str
    initial_weight: float | None = Field(None, description="Default: an equal share")
    model_version: str | int | None = None
    role: Literal["champion", "challenger"] | None = Field(None, description="Default: the first is the champion")


class ShadowIn(_Strict):
    model_config = _strict({"name": "candidate", "model_version": "v3"})

    name: str
    model_version: str | int | None = None


class MetricIn(_Strict):
    model_config = _strict({"name": "converted_units", "role": "primary"},
                            {"name": "error_rate", "role": "guardrail", "margin": 0.01},
                            {"name": "f1", "kind": "ratio", "numerator": {"tp": 2}, "denominator": {"tp": 2, "fp": 1, "fn": 1},
                             "role": "secondary"},
                            {"name": "revenue_per_user", "kind": "mean", "numerator": "revenue", "cap": 500,
                             "role": "secondary", "attribution_window_seconds": 86400})

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
    model_config = _strict({"alpha": 0.05, "power": 0.8, "mde": 0.1, "correction": "holm"})

    alpha: float | None = None
    power: float | None = None
    mde: float | None = None
    correction: str | None = None
    min_sample: int | None = None


class RolloutIn(_Strict):
    model_config = _strict({"challenger": "model-v2", "stages": [5, 25, 50, 100], "min_duration_seconds": 600,
                            "min_sample": 1000})

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

    model_config = _strict({
        "experiment_id": "demo", "strategy": "ThompsonSampling", "warmup": 100,
        "variants": [{"name": "Champion", "initial_weight": 1, "role": "champion", "model_version": "v1"},
                     {"name": "Challenger", "initial_weight": 1, "role": "challenger", "model_version": "v2"}]})

    experiment_id: str
    strategy: str | None = Field(None, description="Default: WeightedSampling (as in a config file)")
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
    model_config = _loose({"name": "Champion", "role": "champion", "initial_weight": 0.5, "model_version": "v1"})

    name: str
    role: str
    initial_weight: float
    model_version: str | None


class LayerOut(BaseModel):
    model_config = _loose({"name": "ranking", "buckets": [0, 5000]})

    name: str
    buckets: list[int] = Field(description="[start, end) of the experiment's buckets in its layer")


class ExperimentOut(BaseModel):
    model_config = _loose({"experiment_id": "demo", "strategy": "ThompsonSampling", "status": "stopped", "epsilon": 0.1,
                          "warmup": 100, "unit": "user", "min_weight": 0.0, "reward_model": "binary",
                          "created_at": "2026-12-02T09:00:00+00:00", "lineage": "demo", "version": 1, "winner": "Challenger",
                          "layer": {"name": "demo", "buckets": [0, 10000]},
                          "variants": [{"name": "Champion", "role": "champion", "initial_weight": 0.5, "model_version": "v1"},
                                       {"name": "Challenger", "role": "challenger", "initial_weight": 0.5,
                                        "model_version": "v2"}]})

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
    model_config = _strict({"unit_id": "user-42"})

    unit_id: str = Field(min_length=1, max_length=256, description="The user id, or the session id for session "
                                                                   "experiments: 1 to 256 printable characters, as "
                                                                   "the events' user_id")

    @field_validator("unit_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        # The events' rule for user_id: a unit assigned here must be able to send its events.
        if not value.isprintable():
            raise ValueError("must not contain control characters (NUL, newline, ...) or lone surrogates")
        return value


class AssignResponse(BaseModel):
    model_config = _loose({"experiment_id": "demo", "unit_id": "user-42", "variant": "Challenger",
                           "propensity": 0.62, "allocation_version": 17, "new": True, "in_experiment": True})

    experiment_id: str
    unit_id: str
    variant: str
    propensity: float
    allocation_version: int | None
    new: bool
    in_experiment: bool = Field(description="False when the unit is outside the experiment's share of its layer: "
                                            "serve the variant, but log no events for it")


class InvocationRequest(_Strict):
    model_config = _strict({"variant": "Challenger", "user_id": "user-42", "event_id": "inv-7f3a",
                            "timestamp": "2026-12-02T09:15:00Z", "propensity": 0.62, "latency_ms": 41.5,
                            "error": False, "model_version": "v2", "values": {"confidence": 0.91}})

    variant: str
    user_id: str
    event_id: str | None = Field(None, description="Generated when absent; send one to make retries idempotent")
    timestamp: float | str | None = Field(None, description="RFC 3339 or epoch seconds; now when absent")
    propensity: float | None = None
    latency_ms: float | None = None
    error: bool = False
    model_version: str | None = None
    values: dict[str, float] | None = Field(
        None, description="Named numbers for metrics of your own (at most 32; names of lower-case letters, digits and _)")


class ConversionRequest(_Strict):
    model_config = _strict({"variant": "Challenger", "user_id": "user-42", "event_id": "conv-91c2",
                            "timestamp": 1796202900.0, "reward": 1.0, "invocation_id": "inv-7f3a",
                            "values": {"revenue": 31.5, "correct": 1, "labelled": 1}})

    variant: str
    user_id: str
    event_id: str | None = None
    timestamp: float | str | None = None
    reward: float = 1.0
    invocation_id: str | None = None
    values: dict[str, float] | None = Field(
        None, description="Named numbers for metrics of your own (at most 32; names of lower-case letters, digits and _)")


class EventAccepted(BaseModel):
    model_config = _loose({"event_id": "inv-7f3a", "accepted": True})

    event_id: str
    accepted: bool


# -- statistics and weights ---------------------------------------------------------------


class VariantStats(BaseModel):
    model_config = _loose({"variant": "Champion", "role": "champion", "invocations": 5120, "conversions": 262,
                             "conversion_rate": 0.0512, "reward_sum": 262.0, "reward_per_invocation": 0.0512, "errors": 4,
                             "error_rate": 0.00078})

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
    model_config = _loose({"experiment_id": "demo", "strategy": "ThompsonSampling", "status": "running",
                           "variants": [{"variant": "Champion", "role": "champion", "invocations": 5120,
                           "conversions": 262,
                             "conversion_rate": 0.0512, "reward_sum": 262.0, "reward_per_invocation": 0.0512, "errors": 4,
                             "error_rate": 0.00078}]})

    experiment_id: str
    strategy: str
    status: str
    variants: list[VariantStats]


class WeightsOut(BaseModel):
    model_config = _loose({"experiment_id": "demo", "version": 17, "weights": {"Champion": 0.38, "Challenger": 0.62}})

    experiment_id: str
    version: int | None = Field(description="The allocation version; null before the first one (initial weights)")
    weights: dict[str, float]


class AllocationOut(BaseModel):
    model_config = _loose({"version": 17, "strategy": "ThompsonSampling", "phase": "bandit",
                           "weights": {"Champion": 0.38, "Challenger": 0.62},
                           "statistics": {"Champion": {"invocations": 5120, "conversions": 262}},
                           "computed_at": "2026-12-02T09:15:00+00:00"})

    version: int
    strategy: str
    phase: str
    weights: dict[str, float]
    statistics: dict[str, Any]
    computed_at: str


class ReportOut(BaseModel):
    """The report (as `abflow report --json`); the README's report section describes each part."""

    model_config = _loose({
        "experiment": {"experiment_id": "demo", "strategy": "ThompsonSampling", "status": "running",
                       "champion": "Champion", "challengers": ["Challenger"]},
        "decision": {"verdict": "keep running", "variant": None, "reasons": ["not enough data for the primary metric yet"]},
        "variants": [{"variant": "Champion", "units": 3769}, {"variant": "Challenger", "units": 5733}],
        "comparisons": [{"metric": "converted_units", "variant": "Challenger", "p_value": 0.012,
                         "test": "two-proportion z-test (pooled) on exposed units"}],
        "guardrails": [], "sample_ratio": {"checked": True, "p_value": 0.94}, "attribution": {"window_seconds": 86400},
        "bayesian": {"metric": "converted_units", "prior": "Beta(1, 1)", "variants": []}, "shadows": [],
        "weights_history": [], "series": [], "notes": []})

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
    model_config = _strict({"reason": "error budget spent elsewhere; hold the canary"})

    reason: str | None = None


class RolloutWeights(BaseModel):
    model_config = _loose({"version": 9, "phase": "rollout", "weights": {"model-v1": 0.75, "model-v2": 0.25}})

    version: int
    phase: str
    weights: dict[str, float]


class RolloutStatusOut(BaseModel):
    model_config = _loose({"experiment_id": "canary", "challenger": "model-v2", "stages": [5, 10, 25, 50, 100],
                                "plan": {"min_duration_seconds": 60}, "state": "running", "stage": 2, "percent": 25,
                                "weights": {"version": 9, "phase": "rollout", "weights": {"model-v1": 0.75, "model-v2": 0.25}},
                                "transitions": [], "stage_started_at": "2026-12-02T09:10:00+00:00"})

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
    exposure: dict[str, Any] | None = Field(
        None, description="What the stage served: per variant, its units and their invocations in the stage, and the "
                          "challenger's share of each")


class PromoteRequest(_Strict):
    model_config = _strict({"variant": "model-v2", "challengers": {"model-v3": "3"}, "reason": "won the canary"})

    variant: str = Field(description="The challenger that won")
    challengers: dict[str, str | None] = Field(default_factory=dict,
                                               description="New challengers of the next version: name → model version")
    reason: str | None = None
    force: bool = Field(False, description="Promote without a completed rollout or a SHIP decision")
    rollout: bool = Field(True, description="When the experiment had a rollout plan, the next version's one "
                                            "challenger starts as a canary at its first stage; false: equal shares")


class PromoteOut(BaseModel):
    model_config = _loose({"experiment_id": "canary", "champion": "model-v2", "model_version": "2", "lineage": "canary",
                          "version": 2, "allocation_version": 12, "next_experiment_id": "canary-v2",
                          "next_variants": ["model-v2", "model-v3"], "evidence": {"decision": "SHIP"}})

    experiment_id: str
    champion: str
    model_version: str | None
    lineage: str
    version: int
    allocation_version: int
    next_experiment_id: str | None
    next_variants: list[str]
    next_rollout: dict[str, Any] | None = Field(None, description="The next version's rollout plan, when it is a canary")
    evidence: dict[str, Any]


class ChampionOut(BaseModel):
    model_config = _loose({"lineage": "canary", "version": 2, "experiment_id": "canary", "variant": "model-v2",
                           "model_version": "2", "promoted_from": "model-v1", "promoted_at": "2026-12-02T10:00:00+00:00",
                           "actor": "admin", "reason": "won the canary", "evidence": {"decision": "SHIP"}})

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
    model_config = _loose({"detail": "no such experiment: nope"})

    detail: str | dict[str, Any] | list[dict[str, Any]] = Field(
        description="What is wrong: a message; {reason, message, field} for events; or, for a body or parameter "
                    "of the wrong shape, one {loc, msg, type} per problem (loc is the field's path)")


class HealthOut(BaseModel):
    model_config = _loose({"status": "ok", "checks": {"postgresql": "ok", "kafka": "ok"}},
                          {"status": "down", "checks": {"postgresql": "down: connection refused", "kafka": "ok"}})

    status: Literal["ok", "down"]
    checks: dict[str, str] = Field(default_factory=dict, description="Each dependency: ok, or down with the reason")


ERRORS = {401: {"model": ErrorOut, "description": "No API key, or an unknown one"},
          403: {"model": ErrorOut, "description": "The key's role may not do this"},
          422: {"model": ErrorOut, "description": "Input that breaks a rule (not JSON, a wrong type, an unknown field, "
                                                  "a value out of range); the body names the field"}}
NOT_FOUND = {404: {"model": ErrorOut, "description": "No such experiment (or rollout)"}}
CONFLICT = {409: {"model": ErrorOut, "description": "The experiment's state refuses the change"}}

"""The experiment config (JSON or YAML) and its validation. Pure: no I/O beyond parsing text."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

import yaml

from abflow.core.errors import Invalid

STRATEGIES = ("WeightedSampling", "EpsilonGreedy", "UCB1", "ThompsonSampling")
ROLES = ("champion", "challenger")
UNITS = ("user", "session")
# \Z, not $: $ also matches before a final newline, and an id ending in one was accepted here but
# refused by the event contract (its experiment could never receive an event).
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
MAX_VARIANTS = 50  # a bandit over more arms learns nothing in a useful time; the report and /metrics grow with them
MAX_WHOLE = 10**9  # warm-up, minimum samples, retries: far beyond use, and within PostgreSQL's integer
MAX_NUMBER = 1e12  # weights, margins, caps, coefficients, durations: finite sums stay finite
MAX_TEXT = 10_000  # characters of a description
MAX_ID_TEXT = 256  # characters of a model version (as in the event contract)

_TOP_LEVEL = {"experiment_id", "strategy", "epsilon", "warmup", "unit", "variants", "description", "min_weight",
              "reward_model", "metrics", "analysis", "rollout", "layer", "traffic", "shadows",
              "attribution_window_seconds"}
REWARD_MODELS = ("binary", "gaussian")
_VARIANT = {"name", "initial_weight", "model_version", "role"}

# Every metric but a latency quantile is computed on the exposed units, from per-unit sums: the
# stream's own (UNIT_VARIABLES) and those of the named ``values`` the events carry (VALUE_NAME).
#   proportion: the share of units whose numerator is > 0 (z-test on units);
#   mean: the per-unit numerator (Welch on units);
#   ratio: Σ numerator / Σ denominator over units (the delta method on units);
#   quantile: of the request latencies (guardrails only; request-level, from the histograms).
# A numerator or a denominator is a linear combination of variables, e.g. F1 = 2·tp / (2·tp + fp + fn).
UNIT_VARIABLES = ("invocations", "conversions", "reward", "errors")
VALUE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
# A unit variable counted only within a shorter attribution window after exposure ("revenue@3600"):
# what a metric with its own attribution_window_seconds reads (storage.units keeps these sums).
WINDOWED_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}@[1-9][0-9]{0,9}\Z")


def windowed(variable: str, seconds: int) -> str:
    """The name of ``variable``'s sum over the events within ``seconds`` of the unit's exposure."""
    return f"{variable}@{seconds}"
METRIC_KINDS = ("proportion", "mean", "ratio")
DIRECTIONS = ("higher", "lower")
Combination = tuple[tuple[str, float], ...]  # (variable, coefficient) pairs


@dataclass(frozen=True)
class MetricDefinition:
    kind: str  # proportion, mean, ratio or quantile
    direction: str  # higher or lower
    numerator: Combination = ()  # proportion, mean, ratio
    denominator: Combination = ()  # ratio only
    quantile: float | None = None  # quantile only
    cap: float | None = None  # per-unit numerator winsorized at this value (mean, ratio)


def _one(variable: str) -> Combination:
    return ((variable, 1.0),)


METRIC_DEFINITIONS = {
    "converted_units": MetricDefinition("proportion", "higher", _one("conversions")),
    "conversion_rate": MetricDefinition("ratio", "higher", _one("conversions"), _one("invocations")),
    "conversions_per_unit": MetricDefinition("mean", "higher", _one("conversions")),
    "reward_per_invocation": MetricDefinition("ratio", "higher", _one("reward"), _one("invocations")),
    "reward_per_unit": MetricDefinition("mean", "higher", _one("reward")),
    "error_rate": MetricDefinition("ratio", "lower", _one("errors"), _one("invocations")),
    "latency_p95": MetricDefinition("quantile", "lower", quantile=0.95),
    "latency_p99": MetricDefinition("quantile", "lower", quantile=0.99),
}
METRICS = {name: definition.direction for name, definition in METRIC_DEFINITIONS.items()}
METRIC_ROLES = ("primary", "secondary", "guardrail")
# Default non-inferiority margins of guardrails: absolute points of error rate, or of the
# challenger's share of requests slower than the champion's quantile.
DEFAULT_MARGINS = {"error_rate": 0.01, "latency_p95": 0.01, "latency_p99": 0.005, "converted_units": 0.005,
                   "conversion_rate": 0.005, "conversions_per_unit": 0.01, "reward_per_invocation": 0.01,
                   "reward_per_unit": 0.01}
CORRECTIONS = ("holm", "benjamini-hochberg")
CORRECTION_ALIASES = {"bh": "benjamini-hochberg"}
_METRIC = {"name", "role", "margin", "attribution_window_seconds"}
_CUSTOM_METRIC = _METRIC | {"kind", "numerator", "denominator", "direction", "cap"}
_ANALYSIS = {"alpha", "power", "mde", "correction", "min_sample"}
_ROLLOUT = {"challenger", "stages", "min_duration_seconds", "min_sample", "max_duration_seconds",
            "check_interval_seconds", "rollback_after", "primary_margin", "webhook_url", "confirm_url",
            "webhook_timeout_seconds", "webhook_retries"}
DEFAULT_STAGES = (5.0, 10.0, 25.0, 50.0, 100.0)
DEFAULT_ATTRIBUTION_WINDOW_SECONDS = 24 * 3600.0
MAX_METRIC_WINDOW_SECONDS = 10**9


class ConfigError(Invalid):
    """The config breaks a rule; the message names the field."""


@dataclass(frozen=True)
class VariantConfig:
    name: str
    initial_weight: float
    role: str
    model_version: str | None = None


@dataclass(frozen=True)
class ShadowConfig:
    """A model called beside the served one on the same requests, whose answer is never served."""

    name: str
    model_version: str | None = None


@dataclass(frozen=True)
class MetricConfig:
    name: str
    role: str
    margin: float | None = None  # guardrails only: how much worse the challenger may be
    custom: MetricDefinition | None = None  # a metric the experiment defines; None: a built-in one
    # Only the events within this many seconds of the unit's exposure count for this metric
    # (None: the experiment's attribution window).
    attribution_window_seconds: int | None = None

    @property
    def definition(self) -> MetricDefinition:
        return self.custom or METRIC_DEFINITIONS[self.name]

    @property
    def higher_is_better(self) -> bool:
        return self.definition.direction == "higher"

    def to_dict(self) -> dict:
        data: dict = {"name": self.name, "role": self.role, "margin": self.margin}
        if self.custom is not None:
            c = self.custom
            data.update(kind=c.kind, direction=c.direction, numerator=dict(c.numerator))
            if c.denominator:
                data["denominator"] = dict(c.denominator)
            if c.cap is not None:
                data["cap"] = c.cap
        if self.attribution_window_seconds is not None:
            data["attribution_window_seconds"] = self.attribution_window_seconds
        return data


@dataclass(frozen=True)
class AnalysisConfig:
    """How the report calls a winner."""

    alpha: float = 0.05
    power: float = 0.8
    mde: float = 0.1  # minimum detectable effect, relative to the champion's primary metric
    correction: str = "holm"
    min_sample: int | None = None  # per variant; None: from a power analysis at the MDE


@dataclass(frozen=True)
class RolloutPlan:
    """A progressive rollout of one challenger: its share of traffic climbs through ``stages``
    (percent, ending at 100) while the guardrails hold, and falls to 0 when one fails."""

    challenger: str
    stages: tuple[float, ...] = DEFAULT_STAGES
    min_duration_seconds: float = 60.0  # per stage
    min_sample: int = 1000  # units the stage served the challenger to
    max_duration_seconds: float = 3600.0  # a stage still inconclusive after this pauses the rollout
    check_interval_seconds: float = 0.5  # at most one check per interval
    rollback_after: int = 2  # consecutive checks that find harm
    primary_margin: float = 0.1  # the primary metric may be this much worse, relative to the champion's
    webhook_url: str | None = None  # POSTed every transition
    confirm_url: str | None = None  # asked before the last stage; a 2xx answer confirms
    webhook_timeout_seconds: float = 5.0
    webhook_retries: int = 3


def default_metrics(reward_model: str) -> tuple[MetricConfig, ...]:
    """Binary rewards: the share of exposed units that converted decides, and the conversions per
    invocation are watched. Continuous rewards: the reward per invocation decides, and the share of
    units that converted is watched. Errors and p95 latency are guarded either way."""
    decisive: tuple[MetricConfig, ...]
    if reward_model == "binary":
        decisive = (MetricConfig("converted_units", "primary"), MetricConfig("conversion_rate", "secondary"))
    else:
        decisive = (MetricConfig("reward_per_invocation", "primary"), MetricConfig("converted_units", "secondary"))
    return decisive + (MetricConfig("error_rate", "guardrail", DEFAULT_MARGINS["error_rate"]),
                       MetricConfig("latency_p95", "guardrail", DEFAULT_MARGINS["latency_p95"]))


@dataclass(frozen=True)
class ExperimentConfig:
    experiment_id: str
    strategy: str
    variants: tuple[VariantConfig, ...]
    epsilon: float = 0.1
    warmup: int = 0
    unit: str = "user"
    min_weight: float = 0.0
    reward_model: str = "binary"
    description: str | None = None
    metrics: tuple[MetricConfig, ...] = ()
    analysis: AnalysisConfig = AnalysisConfig()
    rollout: RolloutPlan | None = None
    layer: str | None = None  # experiments of one layer never share a unit; None: a layer of its own
    traffic: float = 1.0  # the share of the layer's units in this experiment
    shadows: tuple[ShadowConfig, ...] = ()
    # How long after a unit's exposure its events count for it (storage.units).
    attribution_window_seconds: float = DEFAULT_ATTRIBUTION_WINDOW_SECONDS

    @property
    def metric_windows(self) -> tuple[int, ...]:
        """The metrics' own attribution windows, for which the stream keeps windowed sums."""
        return tuple(sorted({m.attribution_window_seconds for m in self.metrics
                             if m.attribution_window_seconds is not None}))
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        if self.rollout is None:
            data.pop("rollout")
        else:
            data["rollout"]["stages"] = list(self.rollout.stages)
        data["variants"] = [asdict(v) for v in self.variants]
        data["metrics"] = [m.to_dict() for m in self.metrics]
        data["shadows"] = [asdict(s) for s in self.shadows]
        return data

    @property
    def normalised_weights(self) -> dict[str, float]:
        total = sum(v.initial_weight for v in self.variants)
        return {v.name: v.initial_weight / total for v in self.variants}


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value!r}")
    if abs(value) > MAX_NUMBER:
        raise ConfigError(f"{where} must be within ±{MAX_NUMBER:g}, got {value!r}")
    return float(value)


def _text(value, where: str, limit: int) -> str | None:
    """Optional free text: printable (newlines and tabs allowed), at most ``limit`` characters."""
    if value is None:
        return None
    value = str(value)
    if len(value) > limit:
        raise ConfigError(f"{where} must have at most {limit} characters, got {len(value)}")
    if not value.replace("\n", "").replace("\t", "").isprintable():
        raise ConfigError(f"{where} must not contain control characters (NUL, ...) or lone surrogates")
    return value


def _check_object(data, allowed: set[str], where: str, shape: str) -> None:
    """``data`` must be an object whose keys are all in ``allowed``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object with {shape}")
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")


def _model_version(value, where: str) -> str | None:
    """A model version as the events carry it: 1 to 256 printable characters (a number is its text)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    text = str(value)
    if not 0 < len(text) <= MAX_ID_TEXT or not text.isprintable():
        raise ConfigError(f"{where} must have 1 to {MAX_ID_TEXT} printable characters")
    return text


def _variant(data, index: int, count: int) -> VariantConfig:
    where = f"variants[{index}]"
    _check_object(data, _VARIANT, where, "'name', 'initial_weight', 'role'")
    name = data.get("name")
    if not isinstance(name, str) or not ID_PATTERN.match(name):
        raise ConfigError(f"{where}.name must match {ID_PATTERN.pattern}, got {name!r}")
    weight = _number(data.get("initial_weight", 1.0 / count), f"{where}.initial_weight")
    if weight < 0:
        raise ConfigError(f"{where}.initial_weight must be >= 0, got {weight}")
    role = data.get("role", "champion" if index == 0 else "challenger")
    if role not in ROLES:
        raise ConfigError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    model_version = _model_version(data.get("model_version"), f"{where}.model_version")
    return VariantConfig(name=name, initial_weight=weight, role=role, model_version=model_version)


def _metrics(data, reward_model: str) -> tuple[MetricConfig, ...]:
    if data is None:
        return default_metrics(reward_model)
    if not isinstance(data, list) or not data:
        raise ConfigError("metrics must be a non-empty list of {name, role, margin} (and kind, numerator, "
                          "denominator, direction, cap for a metric of your own)")
    metrics = []
    for index, item in enumerate(data):
        where = f"metrics[{index}]"
        custom = isinstance(item, dict) and "kind" in item
        _check_object(item, _CUSTOM_METRIC if custom else _METRIC, where, "'name' and 'role'")
        name = item.get("name")
        if custom:
            if not isinstance(name, str) or not VALUE_NAME.match(name) or name in METRICS:
                raise ConfigError(f"{where}.name must be lower case letters, digits and _ (starting with a letter), "
                                  f"and not a built-in metric's name, got {name!r}")
            definition = _custom_definition(item, where)
        elif name not in METRICS:
            raise ConfigError(f"{where}.name must be one of {', '.join(METRICS)} (or give a 'kind' to define "
                              f"your own), got {name!r}")
        else:
            definition = METRIC_DEFINITIONS[name]
        role = item.get("role")
        if role not in METRIC_ROLES:
            raise ConfigError(f"{where}.role must be one of {', '.join(METRIC_ROLES)}, got {role!r}")
        margin = item.get("margin")
        if role == "guardrail":
            if margin is None and custom:
                raise ConfigError(f"{where}.margin is required for a guardrail of your own (how much worse, in the "
                                  "metric's units, the challenger may be)")
            margin = _number(DEFAULT_MARGINS[name] if margin is None else margin, f"{where}.margin")
            if custom and not margin > 0:
                raise ConfigError(f"{where}.margin must be > 0, got {margin}")
            if not custom and not 0 < margin < 1:
                raise ConfigError(f"{where}.margin must be in (0, 1), got {margin}")
        elif margin is not None:
            raise ConfigError(f"{where}.margin applies to guardrails only")
        if role != "guardrail" and definition.kind == "quantile":
            raise ConfigError(f"{where}: {name} can only be a guardrail")
        window = item.get("attribution_window_seconds")
        if window is not None:
            if definition.kind == "quantile":
                raise ConfigError(f"{where}.attribution_window_seconds: {name} is measured per request, not attributed "
                                  "to units")
            if isinstance(window, bool) or not isinstance(window, (int, float)) or window != int(window) \
                    or not 0 < window <= MAX_METRIC_WINDOW_SECONDS:
                raise ConfigError(f"{where}.attribution_window_seconds must be a whole number of seconds in "
                                  f"[1, {MAX_METRIC_WINDOW_SECONDS}], got {window!r}")
            window = int(window)
        metrics.append(MetricConfig(name, role, margin, definition if custom else None, window))
    names = [m.name for m in metrics]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"metrics repeat: {', '.join(repeated)}")
    primaries = [m.name for m in metrics if m.role == "primary"]
    if len(primaries) != 1:
        raise ConfigError(f"exactly one metric must have role 'primary', found {len(primaries)}")
    return tuple(metrics)


def _custom_definition(item: dict, where: str) -> MetricDefinition:
    kind = item.get("kind")
    if kind not in METRIC_KINDS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(METRIC_KINDS)}, got {kind!r}")
    direction = item.get("direction", "higher")
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}.direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    numerator = _combination(item.get("numerator"), f"{where}.numerator")
    denominator: Combination = ()
    if kind == "ratio":
        denominator = _combination(item.get("denominator"), f"{where}.denominator")
    elif item.get("denominator") is not None:
        raise ConfigError(f"{where}.denominator applies to ratio metrics only")
    cap = item.get("cap")
    if cap is not None:
        if kind == "proportion":
            raise ConfigError(f"{where}.cap applies to mean and ratio metrics only")
        cap = _number(cap, f"{where}.cap")
        if not cap > 0:
            raise ConfigError(f"{where}.cap must be > 0, got {cap}")
    return MetricDefinition(kind, direction, numerator, denominator, cap=cap)


def _combination(data, where: str) -> Combination:
    """A variable name, or {variable: coefficient, …}: a linear combination of per-unit sums."""
    if isinstance(data, str):
        data = {data: 1.0}
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where} must be a variable name or an object {{variable: coefficient}}, got {data!r}")
    terms = []
    for variable, coefficient in data.items():
        if not isinstance(variable, str) or not (variable in UNIT_VARIABLES or VALUE_NAME.match(variable)):
            raise ConfigError(f"{where}: {variable!r} is neither one of {', '.join(UNIT_VARIABLES)} nor a value name "
                              "(lower case letters, digits and _, starting with a letter)")
        terms.append((variable, _number(coefficient, f"{where}.{variable}")))
    return tuple(terms)


def _analysis(data) -> AnalysisConfig:
    if data is None:
        return AnalysisConfig()
    _check_object(data, _ANALYSIS, "analysis", "alpha, power, mde, correction, min_sample")
    defaults = AnalysisConfig()
    alpha = _number(data.get("alpha", defaults.alpha), "analysis.alpha")
    power = _number(data.get("power", defaults.power), "analysis.power")
    mde = _number(data.get("mde", defaults.mde), "analysis.mde")
    for name, value in (("alpha", alpha), ("power", power)):
        if not 0 < value < 1:
            raise ConfigError(f"analysis.{name} must be in (0, 1), got {value}")
    if mde <= 0:
        raise ConfigError(f"analysis.mde (relative lift) must be > 0, got {mde}")
    correction = data.get("correction", defaults.correction)
    correction = CORRECTION_ALIASES.get(correction, correction)
    if correction not in CORRECTIONS:
        raise ConfigError(f"analysis.correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    min_sample = data.get("min_sample")
    if min_sample is not None and (isinstance(min_sample, bool) or not isinstance(min_sample, int)
                                   or not 1 <= min_sample <= MAX_WHOLE):
        raise ConfigError(f"analysis.min_sample must be a whole number in [1, {MAX_WHOLE}], got {min_sample!r}")
    return AnalysisConfig(alpha, power, mde, correction, min_sample)


def check_policy_parameters(strategy: str, epsilon: float, min_weight: float, reward_model: str,
                            variants: int) -> None:
    """The rules of the allocation policy's parameters, for the config and the policies alike."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r} (unknown strategy)")
    if not 0.0 <= epsilon <= 1.0:
        raise ConfigError(f"epsilon must be in [0, 1], got {epsilon}")
    if min_weight < 0:
        raise ConfigError(f"min_weight must be >= 0, got {min_weight}")
    if min_weight * variants > 1.0:
        raise ConfigError(f"min_weight {min_weight} x {variants} variants exceeds 1 (at most 1/{variants})")
    if reward_model not in REWARD_MODELS:
        raise ConfigError(f"reward_model must be one of {', '.join(REWARD_MODELS)}, got {reward_model!r}")


def parse_config(data) -> ExperimentConfig:
    """Validate a config already decoded into Python objects."""
    if not isinstance(data, dict):
        raise ConfigError("the experiment config must be an object")
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise ConfigError(f"unknown keys: {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_TOP_LEVEL))})")
    experiment_id = data.get("experiment_id")
    if not isinstance(experiment_id, str) or not ID_PATTERN.match(experiment_id):
        raise ConfigError(f"experiment_id must match {ID_PATTERN.pattern}, got {experiment_id!r}")
    strategy = data.get("strategy", "WeightedSampling")
    epsilon = _number(data.get("epsilon", 0.1), "epsilon")
    warmup = data.get("warmup", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= MAX_WHOLE:
        raise ConfigError(f"warmup must be a whole number in [0, {MAX_WHOLE}], got {warmup!r}")
    unit = data.get("unit", "user")
    if unit not in UNITS:
        raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    raw_variants = data.get("variants")
    if not isinstance(raw_variants, list) or len(raw_variants) < 2:
        raise ConfigError("variants must be a list of at least two variants")
    if len(raw_variants) > MAX_VARIANTS:
        raise ConfigError(f"variants: at most {MAX_VARIANTS} variants, got {len(raw_variants)}")
    variants = tuple(_variant(v, i, len(raw_variants)) for i, v in enumerate(raw_variants))
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"variant names must be unique; repeated: {', '.join(duplicates)}")
    champions = [v.name for v in variants if v.role == "champion"]
    if len(champions) != 1:
        raise ConfigError(f"exactly one variant must have role 'champion', found {len(champions)}")
    if sum(v.initial_weight for v in variants) <= 0:
        raise ConfigError("the initial weights must not all be zero")
    min_weight = _number(data.get("min_weight", 0.0), "min_weight")
    reward_model = data.get("reward_model", "binary")
    check_policy_parameters(strategy, epsilon, min_weight, reward_model, len(variants))
    description = _text(data.get("description"), "description", MAX_TEXT)
    layer = data.get("layer")
    if layer is not None and (not isinstance(layer, str) or not ID_PATTERN.match(layer)):
        raise ConfigError(f"layer must match {ID_PATTERN.pattern}, got {layer!r}")
    traffic = _number(data.get("traffic", 1.0), "traffic")
    if not 0 < traffic <= 1:
        raise ConfigError(f"traffic (the share of the layer's units) must be in (0, 1], got {traffic}")
    attribution = _number(data.get("attribution_window_seconds", DEFAULT_ATTRIBUTION_WINDOW_SECONDS),
                          "attribution_window_seconds")
    if not 0 < attribution <= MAX_METRIC_WINDOW_SECONDS:
        raise ConfigError(f"attribution_window_seconds must be in (0, {MAX_METRIC_WINDOW_SECONDS}], got {attribution}")
    metrics = _metrics(data.get("metrics"), reward_model)
    for index, metric in enumerate(metrics):
        # An event after the experiment's window is not kept for its unit at all.
        if metric.attribution_window_seconds is not None and metric.attribution_window_seconds > attribution:
            raise ConfigError(f"metrics[{index}].attribution_window_seconds ({metric.attribution_window_seconds}) "
                              f"must not exceed the experiment's attribution_window_seconds ({attribution:g})")
    return ExperimentConfig(
        experiment_id=experiment_id,
        strategy=strategy,
        variants=variants,
        epsilon=epsilon,
        warmup=warmup,
        unit=unit,
        min_weight=min_weight,
        reward_model=reward_model,
        description=description,
        metrics=metrics,
        analysis=_analysis(data.get("analysis")),
        rollout=_rollout(data.get("rollout"), [v.name for v in variants if v.role == "challenger"]),
        layer=layer,
        traffic=traffic,
        shadows=_shadows(data.get("shadows"), names),
        attribution_window_seconds=attribution,
    )


def _shadows(data, variant_names: list[str]) -> tuple[ShadowConfig, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError("shadows must be a list of {name, model_version}")
    shadows: list[ShadowConfig] = []
    for index, item in enumerate(data):
        where = f"shadows[{index}]"
        _check_object(item, {"name", "model_version"}, where, "'name' and optionally 'model_version'")
        name = item.get("name")
        if not isinstance(name, str) or not ID_PATTERN.match(name):
            raise ConfigError(f"{where}.name must match {ID_PATTERN.pattern}, got {name!r}")
        if name in variant_names or name in [s.name for s in shadows]:
            raise ConfigError(f"{where}.name {name!r} is already a variant or a shadow")
        shadows.append(ShadowConfig(name, _model_version(item.get("model_version"), f"{where}.model_version")))
    return tuple(shadows)


def _rollout(data, challengers: list[str]) -> RolloutPlan | None:
    if data is None:
        return None
    _check_object(data, _ROLLOUT, "rollout", ", ".join(sorted(_ROLLOUT)))
    challenger = data.get("challenger")
    if challenger is None:
        if len(challengers) != 1:
            raise ConfigError(f"rollout.challenger must name one of {', '.join(challengers)}")
        challenger = challengers[0]
    elif challenger not in challengers:
        raise ConfigError(f"rollout.challenger must be a challenger ({', '.join(challengers)}), got {challenger!r}")
    defaults = RolloutPlan(challenger)
    stages = data.get("stages", list(defaults.stages))
    if not isinstance(stages, list) or not stages:
        raise ConfigError("rollout.stages must be a list of percentages, e.g. [5, 10, 25, 50, 100]")
    stages = tuple(_number(stage, "rollout.stages[]") for stage in stages)
    if any(not 0 < stage <= 100 for stage in stages) or list(stages) != sorted(set(stages)) or stages[-1] != 100:
        raise ConfigError(f"rollout.stages must rise strictly within (0, 100] and end at 100, got {list(stages)}")

    def positive(name: str) -> float:
        value = _number(data.get(name, getattr(defaults, name)), f"rollout.{name}")
        if value <= 0:
            raise ConfigError(f"rollout.{name} must be > 0, got {value}")
        return value

    def whole(name: str, least: int) -> int:
        value = data.get(name, getattr(defaults, name))
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_WHOLE:
            raise ConfigError(f"rollout.{name} must be a whole number in [{least}, {MAX_WHOLE}], got {value!r}")
        return value

    def url(name: str) -> str | None:
        value = data.get(name)
        if value is not None and (not isinstance(value, str) or not re.match(r"^https?://\S+$", value)):
            raise ConfigError(f"rollout.{name} must be an http(s) URL, got {value!r}")
        return value

    min_duration, max_duration = positive("min_duration_seconds"), positive("max_duration_seconds")
    if max_duration < min_duration:
        raise ConfigError(f"rollout.max_duration_seconds ({max_duration}) must be >= min_duration_seconds "
                          f"({min_duration})")
    margin = positive("primary_margin")
    if margin >= 1:
        raise ConfigError(f"rollout.primary_margin is relative to the champion's metric and must be < 1, got {margin}")
    return RolloutPlan(challenger, stages, min_duration, whole("min_sample", 1), max_duration,
                       positive("check_interval_seconds"), whole("rollback_after", 1), margin, url("webhook_url"),
                       url("confirm_url"), positive("webhook_timeout_seconds"), whole("webhook_retries", 0))


def load_config_text(text: str, filename: str = "") -> ExperimentConfig:
    """Parse JSON or YAML text (YAML is a superset of JSON; the name only sharpens the error)."""
    try:
        data = json.loads(text) if filename.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse {filename or 'the config'}: {exc}") from None
    return parse_config(data)

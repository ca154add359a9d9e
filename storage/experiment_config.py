"""The experiment config (JSON or YAML) and its validation. Pure: no I/O beyond parsing text."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

import yaml

STRATEGIES = ("WeightedSampling", "EpsilonGreedy", "UCB1", "ThompsonSampling")
ROLES = ("champion", "challenger")
UNITS = ("user", "session")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

_TOP_LEVEL = {"experiment_id", "strategy", "epsilon", "warmup", "unit", "variants", "description", "min_weight",
              "reward_model"}
REWARD_MODELS = ("binary", "gaussian")
_VARIANT = {"name", "initial_weight", "model_version", "role"}


class ConfigError(ValueError):
    """The config breaks a rule; the message names the field."""


@dataclass(frozen=True)
class VariantConfig:
    name: str
    initial_weight: float
    role: str
    model_version: str | None = None


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
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        data["variants"] = [asdict(v) for v in self.variants]
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
    return float(value)


def _variant(data, index: int, count: int) -> VariantConfig:
    where = f"variants[{index}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object with 'name', 'initial_weight', 'role'")
    unknown = set(data) - _VARIANT
    if unknown:
        raise ConfigError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    name = data.get("name")
    if not isinstance(name, str) or not ID_PATTERN.match(name):
        raise ConfigError(f"{where}.name must match {ID_PATTERN.pattern}, got {name!r}")
    weight = _number(data.get("initial_weight", 1.0 / count), f"{where}.initial_weight")
    if weight < 0:
        raise ConfigError(f"{where}.initial_weight must be >= 0, got {weight}")
    role = data.get("role", "champion" if index == 0 else "challenger")
    if role not in ROLES:
        raise ConfigError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    model_version = data.get("model_version")
    if model_version is not None:
        model_version = str(model_version)
    return VariantConfig(name=name, initial_weight=weight, role=role, model_version=model_version)


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
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    epsilon = _number(data.get("epsilon", 0.1), "epsilon")
    if not 0.0 <= epsilon <= 1.0:
        raise ConfigError(f"epsilon must be in [0, 1], got {epsilon}")
    warmup = data.get("warmup", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be a whole number >= 0, got {warmup!r}")
    unit = data.get("unit", "user")
    if unit not in UNITS:
        raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    raw_variants = data.get("variants")
    if not isinstance(raw_variants, list) or len(raw_variants) < 2:
        raise ConfigError("variants must be a list of at least two variants")
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
    if not 0.0 <= min_weight * len(variants) <= 1.0:
        raise ConfigError(f"min_weight must be in [0, 1/{len(variants)}] for {len(variants)} variants, got {min_weight}")
    reward_model = data.get("reward_model", "binary")
    if reward_model not in REWARD_MODELS:
        raise ConfigError(f"reward_model must be one of {', '.join(REWARD_MODELS)}, got {reward_model!r}")
    description = data.get("description")
    return ExperimentConfig(
        experiment_id=experiment_id,
        strategy=strategy,
        variants=variants,
        epsilon=epsilon,
        warmup=warmup,
        unit=unit,
        min_weight=min_weight,
        reward_model=reward_model,
        description=None if description is None else str(description),
    )


def load_config_text(text: str, filename: str = "") -> ExperimentConfig:
    """Parse JSON or YAML text (YAML is a superset of JSON; the name only sharpens the error)."""
    try:
        data = json.loads(text) if filename.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse {filename or 'the config'}: {exc}") from None
    return parse_config(data)

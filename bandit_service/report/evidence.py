"""Metric evidence from aggregated sums, shared by the report and the rollout controller. Pure.

``cells`` are a metric's summaries per allocation period, ``[{variant: MeanSummary | RatioSummary}, …]``,
made from the units' moments (``UnitMoments``): the unit that was randomized is the observation,
with all its attributed events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from abflow.core.config import MetricConfig, windowed
from bandit_service.stats.adaptive import merge_thin_periods, stratified_means
from bandit_service.stats.decision import GuardrailEvidence
from bandit_service.stats.frequentist import MeanSummary, RatioSummary, StatsInputError
from bandit_service.stats.guardrails import slower_share, slower_share_variance
from bandit_service.stats.sequential import msprt

Cell = MeanSummary | RatioSummary
# Exposed units each variant needs before a guardrail on units is judged. The normal approximation
# under the confidence sequence fails for skewed metrics on fewer units: in 2,000 A/A runs of a 5 %
# arm with lognormal rewards (sd 3 against 1) looked at ten times, false harm calls were 5.8 % of
# the runs with a first look at 50 units and 3.4 % from 100 (tests/unit/bandit_service/test_unequal_arms.py).
GUARDRAIL_MIN_UNITS = 100


@dataclass(frozen=True)
class UnitMoments:
    """The exposed units of one variant (in one allocation period): how many, how many were exposed
    to another variant too, and the sums of each per-unit variable and of each product of two."""

    n: int
    multiple: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    products: dict[tuple[str, str], float] = field(default_factory=dict)  # each pair in both orders

    def __add__(self, other: "UnitMoments") -> "UnitMoments":
        return UnitMoments(self.n + other.n, self.multiple + other.multiple,
                           {k: self.sums.get(k, 0.0) + other.sums.get(k, 0.0) for k in self.sums.keys() | other.sums.keys()},
                           {k: self.products.get(k, 0.0) + other.products.get(k, 0.0)
                            for k in self.products.keys() | other.products.keys()})

    @classmethod
    def of_units(cls, values: dict[str, object], metrics=(), multiple: int = 0) -> "UnitMoments":
        """From per-unit values ({variable: one number per unit}: the stream's sums and the events'
        named values), as PostgreSQL computes them from ``unit_state`` (for tests and simulations)."""
        arrays = {k: np.asarray(v, dtype=float) for k, v in values.items()}
        n = len(next(iter(arrays.values()))) if arrays else 0
        variables, pairs = dict(BASE_VARIABLES), []
        for metric in metrics:
            variables.update(metric_variables(metric))
            pairs += metric_pairs(metric)
        evaluated = {name: _evaluate(variable, arrays, n) for name, variable in variables.items()}
        products = {}
        for a, b in pairs:
            products[(a, b)] = products[(b, a)] = float(evaluated[a] @ evaluated[b])
        return cls(n, multiple, {k: float(v.sum()) for k, v in evaluated.items()}, products)


def _evaluate(variable: tuple, arrays: dict[str, np.ndarray], n: int) -> np.ndarray:
    terms, indicator, cap = variable
    total = np.zeros(n)
    for name, coefficient in terms:
        total = total + coefficient * arrays.get(name, np.zeros(n))
    if indicator:
        total = (total > 0).astype(float)
    if cap is not None:
        total = np.minimum(total, cap)
    return total


EMPTY_UNITS = UnitMoments(0)


# The per-unit variables every report reads (``storage.units.Variable``): the variants table's.
BASE_VARIABLES = {
    "invocations": ((("invocations", 1.0),), False, None),
    "conversions": ((("conversions", 1.0),), False, None),
    "reward": ((("reward", 1.0),), False, None),
    "errors": ((("errors", 1.0),), False, None),
    "converted": ((("conversions", 1.0),), True, None),
}


def metric_variables(metric: MetricConfig) -> dict[str, tuple]:
    """The per-unit variables a metric needs: ``name:y`` (its numerator, as an indicator for a proportion,
    capped when it has a cap) and for a ratio ``name:x`` (its denominator)."""
    d = metric.definition
    if d.kind == "quantile":
        return {}
    numerator, denominator = d.numerator, d.denominator
    if metric.attribution_window_seconds is not None:
        # The unit's sums over the events within the metric's own window of its exposure.
        numerator, denominator = (tuple((windowed(name, metric.attribution_window_seconds), coefficient)
                                        for name, coefficient in terms) for terms in (numerator, denominator))
    variables = {f"{metric.name}:y": (numerator, d.kind == "proportion", d.cap)}
    if d.kind == "ratio":
        variables[f"{metric.name}:x"] = (denominator, False, None)
    return variables


def metric_pairs(metric: MetricConfig) -> list[tuple[str, str]]:
    """The products of its variables a metric needs summed."""
    y, x = f"{metric.name}:y", f"{metric.name}:x"
    kind = metric.definition.kind
    return [] if kind == "quantile" else [(y, y)] if kind != "ratio" else [(y, y), (x, x), (x, y)]


def unit_cell(metric: MetricConfig, moments: UnitMoments) -> Cell:
    """A variant's units as the metric's observations."""
    kind = metric.definition.kind
    y, x = f"{metric.name}:y", f"{metric.name}:x"
    if kind in ("proportion", "mean"):
        return MeanSummary(moments.n, moments.sums.get(y, 0.0), moments.products.get((y, y), 0.0))
    if kind == "ratio":
        return RatioSummary(moments.n, moments.sums.get(x, 0.0), moments.sums.get(y, 0.0),
                            moments.products.get((x, x), 0.0), moments.products.get((y, y), 0.0),
                            moments.products.get((x, y), 0.0))
    raise StatsInputError(f"a {kind} metric is not computed on units")


def mean_or_none(cell: Cell) -> float | None:
    """The cell's mean, or None where there is none yet (no units, or a ratio over nothing)."""
    try:
        return cell.mean if cell.n else None
    except StatsInputError:
        return None


def metric_cells(metric: MetricConfig, periods: list[dict[str, UnitMoments]]) -> list[dict[str, Cell]]:
    return [{variant: unit_cell(metric, moments) for variant, moments in period.items()} for period in periods]


@dataclass(frozen=True)
class Difference:
    difference: float  # challenger − champion, period-weighted
    variance: float  # of the difference
    champion: object  # StratifiedMean of each side
    challenger: object
    periods: int  # used, after merging
    merged: int  # periods merged into a neighbour


def stratified_difference(cells: list[dict[str, Cell]], champion: str, challenger: str) -> Difference:
    """B − A stratified by allocation period (see ``stats.adaptive``)."""
    merged = merge_thin_periods(cells, [champion, challenger])
    traffic = [sum(cell.n for cell in period.values()) for period in merged]
    means = stratified_means(merged, traffic, [champion, challenger])
    a, b = means[champion], means[challenger]
    return Difference(b.mean - a.mean, a.variance + b.variance, a, b, len(merged), len(cells) - len(merged))


def guardrail_row(metric: MetricConfig, champion: str, challenger: str, periods: list[dict[str, UnitMoments]],
                  histograms: dict[str, list[int]], alpha: float) -> dict:
    """Non-inferiority of ``challenger`` on ``metric``, always valid (mixture SPRT with τ = the margin).

    ``excess`` is how much worse the challenger is (positive: worse); the guardrail
    passes when the confidence sequence of the excess lies below the margin and
    harms when it lies above it. Returns the report's guardrail row, with ``error``
    instead of the figures when the data cannot answer yet.
    """
    row = {"metric": metric.name, "variant": challenger, "against": champion, "margin": metric.margin}
    try:
        definition = metric.definition
        if definition.kind == "quantile":
            share, expected, n_b = slower_share(histograms.get(champion) or [], histograms.get(challenger) or [],
                                                definition.quantile)
            excess, variance = share - expected, slower_share_variance(share, expected, n_b)
            row["detail"] = (f"{share:.2%} of {challenger}'s requests are slower than {champion}'s "
                             f"{metric.name[-3:]} (expected {expected:.0%})")
        else:
            n_a, n_b = (sum(p.get(name, EMPTY_UNITS).n for p in periods) for name in (champion, challenger))
            if min(n_a, n_b) < GUARDRAIL_MIN_UNITS:
                raise StatsInputError(f"{metric.name} is judged from {GUARDRAIL_MIN_UNITS} exposed units in each "
                                      f"variant on ({champion} {n_a}, {challenger} {n_b})")
            found = stratified_difference(metric_cells(metric, periods), champion, challenger)
            excess = -found.difference if metric.higher_is_better else found.difference
            variance = found.variance
            row["detail"] = (f"{metric.name}: {champion} {found.champion.mean:.4g}, "
                             f"{challenger} {found.challenger.mean:.4g}")
            if variance <= 0 and definition.kind in ("proportion", "ratio"):
                # Not one event in either variant (no errors at all): take the variance one
                # event in each would give, rather than certainty.
                variance = (1 - 1 / n_a) / n_a**2 + (1 - 1 / n_b) / n_b**2
        if variance <= 0:
            raise StatsInputError("no variation in either variant")
    except StatsInputError as exc:
        return {**row, "error": str(exc)}
    sequential = msprt(excess, variance, metric.margin, alpha)
    evidence = GuardrailEvidence(metric.name, metric.margin, excess, sequential.interval.low, sequential.interval.high)
    row.update(excess=excess, low=evidence.low, high=evidence.high, non_inferior=evidence.non_inferior,
               harmful=evidence.harmful,
               status="harm" if evidence.harmful else "pass" if evidence.non_inferior else "not yet shown")
    return row

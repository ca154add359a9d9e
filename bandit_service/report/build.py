"""The experiment report: every variant's figures, each challenger against the champion, the
guardrails, the sample-ratio check, the Bayesian view and the decision. Pure: ``ReportInput``
holds what ``bandit_service.report.load`` read from PostgreSQL (or what a test built in memory);
``build_report`` returns plain JSON-ready data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from scipy import stats

from abflow.core.config import ExperimentConfig, MetricConfig
from abflow.core.text import json_safe
from abflow.core.windowing import LATENCY_BUCKETS, histogram_quantile
from bandit_service.policies import BINARY, ArmStats, thompson_probabilities
from bandit_service.report.evidence import (
    EMPTY_UNITS,
    UnitMoments,
    guardrail_row,
    metric_cells,
    stratified_difference,
)
from bandit_service.stats.adaptive import (
    EMPTY,
    merge_thin_periods,
    pooled,
    stratified_means,
)
from bandit_service.stats.bayesian import BetaPosterior, expected_loss, prob_b_beats_a
from bandit_service.stats.checks import adjust_p_values, expected_shares_from_history, sample_ratio_mismatch
from bandit_service.stats.decision import ChallengerEvidence, GuardrailEvidence, decide
from bandit_service.stats.frequentist import (
    MeanSummary,
    RatioSummary,
    StatsInputError,
    mcnemar_test,
    mean_difference_interval,
    paired_rate_difference_interval,
    ratio_difference_test,
    relative_lift_interval,
    two_proportion_z_test,
    welch_t_test,
    wilson_interval,
)
from bandit_service.stats.power import sample_size_msprt
from bandit_service.stats.sequential import msprt

SRM_THRESHOLD = 0.001
POSTERIOR_DRAWS = 20_000


@dataclass
class ReportInput:
    config: ExperimentConfig
    status: str
    # Sums of the invocations and conversions per variant and allocation period (0 before the
    # first period start, k from the k-th on), by the time of each event: the traffic.
    periods: dict[int, dict[str, dict]]
    # (version, computed_at, weights) in version order.
    allocations: list[tuple[int, datetime, dict[str, float]]]
    histograms: dict[str, list[int]] = field(default_factory=dict)  # latency, over the whole experiment
    # The exposed units per allocation period of exposure and variant, with the moments of their
    # attributed sums: what the comparisons analyse (storage.units.unit_moments).
    units: dict[int, dict[str, UnitMoments]] = field(default_factory=dict)
    # Exposed units per (weights in effect at exposure: 0 the initial ones, k the k-th allocation
    # version's; variant): what the sample-ratio check tests.
    exposures: dict[tuple[int, str], int] = field(default_factory=dict)
    # Events that did not count as they claimed, per (variant, reason) (abflow.core.attribution.REASONS).
    attribution: dict[tuple[str, str], int] = field(default_factory=dict)
    # Cumulative series for the plots: (bucket start, variant, invocations, conversions, reward_sum).
    series: list[tuple[datetime, str, int, int, float]] = field(default_factory=list)
    # Shadow releases: per (shadow, served variant), storage.queries.shadow_totals.
    shadows: list[dict] = field(default_factory=list)


def _number(value: float | None) -> float | None:
    """JSON has no inf or nan."""
    return None if value is None or not math.isfinite(value) else float(value)


def _orient(metric: MetricConfig, difference: float, low: float, high: float) -> tuple[float, float, float]:
    """(B − A, low, high) turned so that positive is better."""
    return (difference, low, high) if metric.higher_is_better else (-difference, -high, -low)


class _Experiment:
    """The report's working state; ``build`` assembles the sections."""

    def __init__(self, data: ReportInput) -> None:
        self.data = data
        self.config = data.config
        self.names = [v.name for v in self.config.variants]
        self.champion = next(v.name for v in self.config.variants if v.role == "champion")
        self.challengers = [n for n in self.names if n != self.champion]
        self.alpha = self.config.analysis.alpha
        self.ordered_periods = [data.periods[k] for k in sorted(data.periods)]
        self.totals = {name: {} for name in self.names}
        for period in self.ordered_periods:
            for name, sums in period.items():
                bucket = self.totals.setdefault(name, {})
                for key, value in sums.items():
                    bucket[key] = bucket.get(key, 0) + (value or 0)
        self.unit_periods = [data.units[k] for k in sorted(data.units)]
        self.units = pooled(self.unit_periods)
        self.notes: list[str] = []

    # -- per variant -------------------------------------------------------------------------

    def _hist(self, name: str) -> list[int]:
        return list(self.data.histograms.get(name) or [0] * LATENCY_BUCKETS)

    def variants(self) -> list[dict]:
        current = self.data.allocations[-1][2] if self.data.allocations else self.config.normalised_weights
        converted = self.adjusted_converted()
        rows = []
        for v in self.config.variants:
            t = self.totals.get(v.name, {})
            n = int(t.get("invocations", 0))
            conversions = int(t.get("conversions", 0))
            units = self.units.get(v.name, EMPTY_UNITS)
            row = {"variant": v.name, "role": v.role, "model_version": v.model_version,
                   "initial_weight": self.config.normalised_weights[v.name], "weight": current.get(v.name, 0.0),
                   "units": units.n, "multiple_exposures": units.multiple,
                   "converted_units": int(units.sums.get("converted", 0)),
                   "converted_share": None, "converted_share_low": None, "converted_share_high": None,
                   "converted_share_adjusted": None,
                   "invocations": n, "conversions": conversions, "conversion_rate": None,
                   "reward_per_invocation": None, "error_rate": None, "latency_p95_ms": None, "latency_p99_ms": None}
            if units.n:
                interval = wilson_interval(int(units.sums.get("converted", 0)), units.n, 1 - self.alpha)
                row.update(converted_share=interval.estimate, converted_share_low=interval.low,
                           converted_share_high=interval.high,
                           converted_share_adjusted=converted[v.name].mean if converted[v.name].n else None)
            if n:
                hist = self._hist(v.name)
                row.update(conversion_rate=conversions / n, reward_per_invocation=t.get("reward_sum", 0.0) / n,
                           error_rate=int(t.get("errors", 0)) / n,
                           latency_p95_ms=_number(histogram_quantile(hist, 0.95)),
                           latency_p99_ms=_number(histogram_quantile(hist, 0.99)))
            rows.append(row)
        return rows

    def shadows(self) -> list[dict]:
        """Each shadow beside the variant served on the same requests: how often they agreed, and
        each side's error rate and latency (Wilson intervals for the rates). Both sides answered
        the same requests, so their error rates are compared as pairs: McNemar's exact test on
        the requests where only one side failed, and Newcombe's paired interval."""
        rows = []
        level = 1 - self.alpha
        for s in self.data.shadows:
            requests, compared = int(s["requests"]), int(s["compared"])
            row = {"variant": s["variant"], "served_variant": s["served_variant"], "requests": requests,
                   "compared": compared}
            if compared:
                agreement = wilson_interval(int(s["agreements"]), compared, level)
                row.update(agreement=agreement.estimate, agreement_low=agreement.low, agreement_high=agreement.high)
            for side, prefix in (("shadow", ""), ("served", "served_")):
                errors = wilson_interval(int(s[f"{prefix}errors"]), requests, level)
                count = int(s[f"{prefix}latency_count"])
                row[side] = {"error_rate": errors.estimate, "error_rate_low": errors.low, "error_rate_high": errors.high,
                             "latency_mean_ms": float(s[f"{prefix}latency_ms_sum"]) / count if count else None,
                             "latency_p95_ms": _number(histogram_quantile(s[f"{prefix}latency_hist"], 0.95)),
                             "latency_p99_ms": _number(histogram_quantile(s[f"{prefix}latency_hist"], 0.99))}
            if requests:
                both = int(s["both_errors"])
                shadow_only, served_only = int(s["errors"]) - both, int(s["served_errors"]) - both
                difference = paired_rate_difference_interval(both, served_only, shadow_only, requests, level)
                row["errors_paired"] = {"both": both, "shadow_only": shadow_only, "served_only": served_only,
                                        "difference": difference.estimate, "low": difference.low,
                                        "high": difference.high,
                                        "p_value": mcnemar_test(served_only, shadow_only).p_value}
            rows.append(row)
        return rows

    # -- comparisons -------------------------------------------------------------------------

    def _cells(self, metric: MetricConfig) -> list[dict]:
        return metric_cells(metric, self.unit_periods)

    def _tau(self, metric: MetricConfig, scale: float) -> float:
        """The mixture scale of the mSPRT: the smallest effect worth finding."""
        try:
            everyone = sum(pooled(self._cells(metric)).values(), EMPTY)
            baseline = abs(everyone.mean) if everyone.n else 0.0
        except StatsInputError:
            baseline = 0.0
        return scale * baseline if baseline > 0 else scale

    def comparison(self, metric: MetricConfig, challenger: str) -> dict:
        row = {"metric": metric.name, "role": metric.role, "variant": challenger, "against": self.champion}
        try:
            cells = self._cells(metric)
            found = stratified_difference(cells, self.champion, challenger)
        except StatsInputError as exc:
            return {**row, "error": str(exc)}
        difference, variance, a, b, used, merged = (found.difference, found.variance, found.champion,
                                                    found.challenger, found.periods, found.merged)
        if merged:
            self.notes.append(f"{metric.name}, {challenger}: {merged} allocation period(s) merged into a neighbour "
                              "because a variant had under 2 exposed units in them; give the bandit a min_weight "
                              "to keep the estimate unbiased")
        row.update(champion_mean=a.mean, challenger_mean=b.mean, difference=difference, periods=used)
        if variance <= 0:
            return {**row, "error": "no variation in either variant: nothing to test"}
        se = math.sqrt(variance)
        z = stats.norm.ppf(1 - self.alpha / 2)
        row.update(low=difference - z * se, high=difference + z * se,
                   p_value=float(2 * stats.norm.sf(abs(difference) / se)),
                   test=f"normal, stratified over {used} allocation periods of exposure")
        if used == 1:
            try:
                row.update(self._fixed_horizon_test(metric, pooled(cells)[self.champion], pooled(cells)[challenger]))
            except StatsInputError as exc:
                return {**row, "error": str(exc)}
        if a.mean != 0:
            try:
                lift = relative_lift_interval(a.mean, a.variance, b.mean, b.variance, 1 - self.alpha)
                row.update(lift=lift.estimate, lift_low=lift.low, lift_high=lift.high)
            except StatsInputError:
                pass  # no interval for the lift yet: the row shows none rather than a certainty
        tau = self._tau(metric, self.config.analysis.mde)
        sequential = msprt(difference, variance, tau, self.alpha)
        row.update(always_valid_p=sequential.p_value, always_valid_low=sequential.interval.low,
                   always_valid_high=sequential.interval.high, tau=tau)
        return row

    def _fixed_horizon_test(self, metric: MetricConfig, a, b) -> dict:
        """One allocation period (the weights never moved): the textbook test of the metric's kind, on units."""
        level = 1 - self.alpha
        kind = metric.definition.kind
        if kind == "proportion":
            test = two_proportion_z_test(int(round(a.total)), a.n, int(round(b.total)), b.n)
            return {"p_value": test.p_value, "test": "two-proportion z-test (pooled) on exposed units"}
        if kind == "ratio":
            assert isinstance(a, RatioSummary) and isinstance(b, RatioSummary)
            test, interval = ratio_difference_test(a, b, level)
            return {"p_value": test.p_value, "low": interval.low, "high": interval.high,
                    "test": "delta method on exposed units (Deng, Knoblich and Lu 2018)"}
        test = welch_t_test(a, b)
        interval = mean_difference_interval(a, b, level)
        return {"p_value": test.p_value, "low": interval.low, "high": interval.high,
                "test": "Welch's t-test on exposed units"}

    def guardrail(self, metric: MetricConfig, challenger: str) -> dict:
        return guardrail_row(metric, self.champion, challenger, self.unit_periods,
                             {name: self._hist(name) for name in (self.champion, challenger)}, self.alpha)

    # -- checks --------------------------------------------------------------------------------

    def sample_ratio(self) -> dict:
        """Exposed units per variant against the weights in effect when each was exposed (the
        weights its assignment was drawn from, for the API and the SDK alike)."""
        if not self.data.exposures:
            return {"checked": False, "reason": "no exposed units yet"}
        weights_of = [self.config.normalised_weights] + [weights for _, _, weights in self.data.allocations]
        observed: dict[str, int] = {name: 0 for name in self.names}
        per_version: dict[int, int] = {}
        for (version, variant), count in self.data.exposures.items():
            observed[variant] = observed.get(variant, 0) + count
            per_version[version] = per_version.get(version, 0) + count
        history = [(count, weights_of[version]) for version, count in sorted(per_version.items())]
        try:
            shares = expected_shares_from_history(history)
            check = sample_ratio_mismatch(observed, shares, SRM_THRESHOLD)
        except StatsInputError as exc:
            return {"checked": False, "reason": str(exc)}
        return {"checked": True, "source": "exposed units, against the weights in effect at each exposure",
                "observed": check.observed, "expected_shares": check.expected,
                "statistic": check.statistic, "p_value": check.p_value, "mismatch": check.mismatch,
                "threshold": SRM_THRESHOLD}

    def attribution(self) -> dict:
        """How the events were attributed to the units' exposures, and what did not count as it claimed."""
        return {"window_seconds": self.config.attribution_window_seconds,
                "multiple_exposures": {name: self.units.get(name, EMPTY_UNITS).multiple for name in self.names},
                "events": [{"variant": variant, "reason": reason, "count": count}
                           for (variant, reason), count in sorted(self.data.attribution.items())]}

    def min_sample(self, primary: MetricConfig) -> int | None:
        """Exposed units per variant at which the test the decision uses (the mixture SPRT, with the
        comparison's τ) has the power asked at the MDE; or the configured ``min_sample``."""
        analysis = self.config.analysis
        if analysis.min_sample is not None:
            return analysis.min_sample
        try:
            champion = pooled(self._cells(primary)).get(self.champion, EMPTY)
            if champion.n < 2 or champion.mean == 0:
                return None
            tau = self._tau(primary, analysis.mde)
            if primary.definition.kind == "proportion":
                target = champion.mean * (1 + analysis.mde) if primary.higher_is_better else champion.mean * (1 - analysis.mde)
                if not 0 < target < 1 or champion.mean >= 1:
                    return None
                return sample_size_msprt(target - champion.mean, champion.mean * (1 - champion.mean),
                                         target * (1 - target), tau, analysis.alpha, analysis.power)[0]
            return sample_size_msprt(analysis.mde * abs(champion.mean), champion.variance, champion.variance, tau,
                                     analysis.alpha, analysis.power)[0]
        except StatsInputError:
            return None

    def adjusted_converted(self) -> dict[str, MeanSummary]:
        """Each variant's share of units that converted as (effective) counts: the raw counts in one
        allocation period; across several, the counts whose mean and variance match the
        period-weighted estimate (so a bandit's moved weights do not tilt the Bayesian view either)."""
        # The units' own "converted" indicator (every report reads it), not a metric's variable: the
        # experiment's metrics may not include converted_units, and its sums would then read as 0
        # (a completed canary showed 0.00 % beside raw shares of 94 % and 96 %).
        cells = [{name: MeanSummary(m.n, m.sums.get("converted", 0.0), m.sums.get("converted", 0.0))
                  for name, m in period.items()} for period in self.unit_periods]
        raw = {name: pooled(cells).get(name, EMPTY) for name in self.names}
        if len(cells) <= 1 or any(cell.n < 2 for cell in raw.values()):
            return raw
        try:
            merged = merge_thin_periods(cells, self.names)
            traffic = [sum(cell.n for cell in period.values()) for period in merged]
            means = stratified_means(merged, traffic, self.names)
        except StatsInputError:
            return raw
        effective = {}
        for name, estimate in means.items():
            if estimate.variance <= 0 or not 0 < estimate.mean < 1:
                effective[name] = raw[name]
                continue
            n = estimate.mean * (1 - estimate.mean) / estimate.variance
            effective[name] = MeanSummary(int(round(n)), estimate.mean * round(n), estimate.mean * round(n))
        return effective

    def bayesian(self) -> dict:
        """Beta-Binomial view of the share of exposed units that converted (uniform prior), on the adjusted counts."""
        posteriors = {name: BetaPosterior(1.0 + cell.total, 1.0 + cell.n - cell.total)
                      for name, cell in self.adjusted_converted().items()}
        level = 1 - self.alpha
        arms = [ArmStats(name, 1.0, int(round(p.alpha + p.beta - 2)), p.alpha - 1, p.alpha - 1)
                for name, p in posteriors.items()]
        p_best = thompson_probabilities(arms, BINARY, np.random.default_rng(0), POSTERIOR_DRAWS)
        rows = []
        for name, posterior in posteriors.items():
            interval = posterior.credible_interval(level)
            row = {"variant": name, "alpha": posterior.alpha, "beta": posterior.beta, "mean": interval.estimate,
                   "low": interval.low, "high": interval.high, "p_best": p_best[name]}
            if name != self.champion:
                champion = posteriors[self.champion]
                loss_keep, loss_switch = expected_loss(champion, posterior)
                row.update(p_beats_champion=prob_b_beats_a(champion, posterior),
                           expected_loss_keeping_champion=loss_keep, expected_loss_switching=loss_switch)
            rows.append(row)
        counts = "raw counts" if len(self.unit_periods) <= 1 else "effective counts of the period-weighted estimate"
        return {"metric": "converted_units", "prior": "Beta(1, 1)", "counts": counts, "level": level, "variants": rows}

    # -- everything ----------------------------------------------------------------------------

    def build(self) -> dict:
        config = self.config
        primary = next(m for m in config.metrics if m.role == "primary")
        secondary = [m for m in config.metrics if m.role == "secondary"]
        guardrail_metrics = [m for m in config.metrics if m.role == "guardrail"]

        comparisons = [self.comparison(m, c) for m in [primary] + secondary for c in self.challengers]
        for role in ("primary", "secondary"):
            family = [r for r in comparisons if r["role"] == role and "p_value" in r]
            for key in ("p_value", "always_valid_p"):
                adjusted = adjust_p_values({i: r[key] for i, r in enumerate(family)}, config.analysis.correction,
                                           self.alpha)
                for i, r in enumerate(family):
                    r[key + "_adjusted"] = adjusted[i][0]
        guardrails = [self.guardrail(m, c) for m in guardrail_metrics for c in self.challengers]
        srm = self.sample_ratio()
        min_sample = self.min_sample(primary)
        champion_mean = next((r["champion_mean"] for r in comparisons if "champion_mean" in r), None)
        mde_abs = config.analysis.mde * abs(champion_mean) if champion_mean else None

        evidence = []
        for r in comparisons:
            if r["role"] != "primary" or "always_valid_p_adjusted" not in r:
                continue
            improvement, low, high = _orient(primary, r["difference"], r["always_valid_low"], r["always_valid_high"])
            gates = tuple(GuardrailEvidence(g["metric"], g["margin"], g["excess"], g["low"], g["high"])
                          for g in guardrails if g["variant"] == r["variant"] and "excess" in g)
            missing = [g for g in guardrails if g["variant"] == r["variant"] and "excess" not in g]
            # A guardrail that cannot be computed yet is not shown non-inferior.
            gates += tuple(GuardrailEvidence(g["metric"], g["margin"], math.nan, -math.inf, math.inf) for g in missing)
            evidence.append(ChallengerEvidence(r["variant"], self.units.get(r["variant"], EMPTY_UNITS).n,
                                               improvement, low, high, r["always_valid_p_adjusted"], gates))
        champion_n = self.units.get(self.champion, EMPTY_UNITS).n
        if evidence:
            decision = decide(self.champion, champion_n, evidence, self.alpha, min_sample, mde_abs,
                              bool(srm.get("mismatch")), primary.name)
            verdict = {"verdict": decision.verdict, "variant": decision.variant, "reasons": list(decision.reasons)}
        else:
            errors = [f"{r['variant']}: {r['error']}" for r in comparisons if r["role"] == "primary"]
            verdict = {"verdict": "keep running", "variant": None,
                       "reasons": ["not enough data for the primary metric yet"] + errors}
        weights_history = [{"version": version, "computed_at": computed_at.isoformat(), "weights": weights}
                           for version, computed_at, weights in self.data.allocations]
        return {
            "experiment": {"experiment_id": config.experiment_id, "strategy": config.strategy, "status": self.data.status,
                           "champion": self.champion, "challengers": self.challengers,
                           "metrics": [{"name": m.name, "role": m.role, "margin": m.margin,
                                        "attribution_window_seconds": None if m.definition.kind == "quantile" else
                                        m.attribution_window_seconds or config.attribution_window_seconds}
                                       for m in config.metrics],
                           "analysis": {"alpha": self.alpha, "power": config.analysis.power, "mde": config.analysis.mde,
                                        "correction": config.analysis.correction, "min_sample": min_sample},
                           "allocation_periods": len(self.unit_periods),
                           "attribution_window_seconds": config.attribution_window_seconds},
            "decision": verdict,
            "variants": self.variants(),
            "comparisons": comparisons,
            "guardrails": guardrails,
            "sample_ratio": srm,
            "attribution": self.attribution(),
            "bayesian": self.bayesian(),
            "shadows": self.shadows(),
            "weights_history": weights_history,
            "series": [{"time": t.isoformat(), "variant": v, "invocations": n, "conversions": c, "reward_sum": r}
                       for t, v, n, c, r in self.data.series],
            "notes": sorted(set(self.notes)),
        }


def build_report(data: ReportInput) -> dict:
    """The whole report as JSON-ready data (no inf or nan)."""
    return json_safe(_Experiment(data).build())

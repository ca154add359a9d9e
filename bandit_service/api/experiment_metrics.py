"""Per-experiment Prometheus metrics: what an operator graphs and alerts on.

A scrape reads each running experiment's weights, totals and rollout, and builds its report (the
decision, the primary metric's always-valid interval, the guardrails, the sample-ratio check) at
most every ``ttl`` seconds: a report is not free, and scrapes in between get the same figures.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import Engine

from abflow.core.errors import AbflowError
from bandit_service.report.build import build_report
from bandit_service.report.load import load_report_input
from bandit_service.rollouts.controller import status as rollout_status
from bandit_service.rollouts.machine import ABORTED, COMPLETED, PAUSED, ROLLED_BACK, RUNNING
from bandit_service.stats.decision import DO_NOT_SHIP, KEEP_RUNNING, SHIP, STOP_FOR_HARM
from storage.queries import allocation_history, variant_totals
from storage.registry import list_experiments

log = logging.getLogger(__name__)

VERDICTS = (SHIP, KEEP_RUNNING, DO_NOT_SHIP, STOP_FOR_HARM)
ROLLOUT_STATES = ("not started", RUNNING, PAUSED, COMPLETED, ROLLED_BACK, ABORTED)


class ExperimentCollector:
    def __init__(self, engine: Engine, ttl: float = 10.0):
        self.engine = engine
        self.ttl = ttl
        self._lock = threading.Lock()
        self._measured_at = float("-inf")
        self._families: list[Metric] = []

    def collect(self):
        with self._lock:
            if time.monotonic() - self._measured_at >= self.ttl:
                self._families = self._measure()
                self._measured_at = time.monotonic()
            return list(self._families)

    def _measure(self) -> list[Metric]:
        exp = ["experiment_id"]
        weight = GaugeMetricFamily("abflow_experiment_weight", "Allocation weight in force", labels=exp + ["variant"])
        invocations = CounterMetricFamily("abflow_experiment_invocations", "Invocations counted",
                                          labels=exp + ["variant"])
        conversions = CounterMetricFamily("abflow_experiment_conversions", "Conversions counted",
                                          labels=exp + ["variant"])
        errors = CounterMetricFamily("abflow_experiment_errors", "Failed invocations counted", labels=exp + ["variant"])
        units = GaugeMetricFamily("abflow_experiment_units", "Units exposed", labels=exp + ["variant"])
        decision = GaugeMetricFamily("abflow_experiment_decision", "1 for the report's verdict now, 0 for the others",
                                     labels=exp + ["verdict"])
        difference = GaugeMetricFamily("abflow_experiment_primary_difference",
                                       "Primary metric: challenger minus champion", labels=exp + ["variant", "metric"])
        low = GaugeMetricFamily("abflow_experiment_primary_always_valid_low",
                                "Primary metric: low end of the difference's always-valid interval",
                                labels=exp + ["variant", "metric"])
        high = GaugeMetricFamily("abflow_experiment_primary_always_valid_high",
                                 "Primary metric: high end of the difference's always-valid interval",
                                 labels=exp + ["variant", "metric"])
        harm = GaugeMetricFamily("abflow_experiment_guardrail_harm", "1 when the guardrail finds harm, else 0",
                                 labels=exp + ["variant", "metric"])
        ratio = GaugeMetricFamily("abflow_experiment_sample_ratio_p_value",
                                  "p-value of the sample-ratio check on exposed units", labels=exp)
        stage = GaugeMetricFamily("abflow_rollout_stage_percent", "The rollout's current stage, in percent", labels=exp)
        state = GaugeMetricFamily("abflow_rollout_state", "1 for the rollout's state now, 0 for the others",
                                  labels=exp + ["state"])
        families = [weight, invocations, conversions, errors, units, decision, difference, low, high, harm, ratio,
                    stage, state]
        for experiment in list_experiments(self.engine):
            if experiment.status != "running":
                continue
            experiment_id = experiment.experiment_id
            try:
                self._experiment(experiment, families)
            except AbflowError as exc:  # one experiment's problem must not hide the others
                log.warning("metrics of %s: %s", experiment_id, exc)
        return families

    def _experiment(self, experiment, families: list) -> None:
        weight, invocations, conversions, errors, units, decision, difference, low, high, harm, ratio, stage, state = \
            families
        experiment_id = experiment.experiment_id
        newest = allocation_history(self.engine, experiment_id, 1)
        weights = newest[0]["weights"] if newest else {
            v.name: v.initial_weight / sum(w.initial_weight for w in experiment.variants) for v in experiment.variants}
        for variant, value in weights.items():
            weight.add_metric([experiment_id, variant], float(value))
        totals = {row["variant"]: row for row in variant_totals(self.engine, experiment_id)}
        for v in experiment.variants:
            row = totals.get(v.name, {})
            invocations.add_metric([experiment_id, v.name], float(row.get("invocations", 0)))
            conversions.add_metric([experiment_id, v.name], float(row.get("conversions", 0)))
            errors.add_metric([experiment_id, v.name], float(row.get("errors", 0)))
        report = build_report(load_report_input(self.engine, experiment_id))
        for row in report["variants"]:
            units.add_metric([experiment_id, row["variant"]], float(row.get("units") or 0))
        verdict = report["decision"]["verdict"]
        for candidate in VERDICTS:
            decision.add_metric([experiment_id, candidate], 1.0 if candidate == verdict else 0.0)
        for row in report["comparisons"]:
            if row["role"] == "primary" and row.get("always_valid_low") is not None:
                labels = [experiment_id, row["variant"], row["metric"]]
                difference.add_metric(labels, row["difference"])
                low.add_metric(labels, row["always_valid_low"])
                high.add_metric(labels, row["always_valid_high"])
        for row in report["guardrails"]:
            harm.add_metric([experiment_id, row["variant"], row["metric"]], 1.0 if row.get("harmful") else 0.0)
        if report["sample_ratio"].get("p_value") is not None:
            ratio.add_metric([experiment_id], report["sample_ratio"]["p_value"])
        if experiment.config.get("rollout"):
            with self.engine.raw_connection() as raw:
                current = rollout_status(raw.driver_connection, experiment_id, transitions=0)
            if current["percent"] is not None:
                stage.add_metric([experiment_id], current["percent"])
            for candidate in ROLLOUT_STATES:
                state.add_metric([experiment_id, candidate], 1.0 if candidate == current["state"] else 0.0)

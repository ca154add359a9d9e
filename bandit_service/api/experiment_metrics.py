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
from storage.queries import variant_totals
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
        by_variant, by_metric = ["experiment_id", "variant"], ["experiment_id", "variant", "metric"]
        families = {
            "weight": GaugeMetricFamily("abflow_experiment_weight", "Allocation weight in force", labels=by_variant),
            "invocations": CounterMetricFamily("abflow_experiment_invocations", "Invocations counted",
                                               labels=by_variant),
            "conversions": CounterMetricFamily("abflow_experiment_conversions", "Conversions counted",
                                               labels=by_variant),
            "errors": CounterMetricFamily("abflow_experiment_errors", "Failed invocations counted", labels=by_variant),
            "units": GaugeMetricFamily("abflow_experiment_units", "Units exposed", labels=by_variant),
            "decision": GaugeMetricFamily("abflow_experiment_decision",
                                          "1 for the report's verdict now, 0 for the others",
                                          labels=["experiment_id", "verdict"]),
            "difference": GaugeMetricFamily("abflow_experiment_primary_difference",
                                            "Primary metric: challenger minus champion", labels=by_metric),
            "low": GaugeMetricFamily("abflow_experiment_primary_always_valid_low",
                                     "Primary metric: low end of the difference's always-valid interval",
                                     labels=by_metric),
            "high": GaugeMetricFamily("abflow_experiment_primary_always_valid_high",
                                      "Primary metric: high end of the difference's always-valid interval",
                                      labels=by_metric),
            "harm": GaugeMetricFamily("abflow_experiment_guardrail_harm", "1 when the guardrail finds harm, else 0",
                                      labels=by_metric),
            "ratio": GaugeMetricFamily("abflow_experiment_sample_ratio_p_value",
                                       "p-value of the sample-ratio check on exposed units", labels=["experiment_id"]),
            "stage": GaugeMetricFamily("abflow_rollout_stage_percent", "The rollout's current stage, in percent",
                                       labels=["experiment_id"]),
            "state": GaugeMetricFamily("abflow_rollout_state", "1 for the rollout's state now, 0 for the others",
                                       labels=["experiment_id", "state"]),
        }
        for experiment in list_experiments(self.engine):
            if experiment.status != "running":
                continue
            try:
                self._experiment(experiment, families)
            except AbflowError as exc:  # one experiment's problem must not hide the others
                log.warning("metrics of %s: %s", experiment.experiment_id, exc)
        return list(families.values())

    def _experiment(self, experiment, f: dict[str, Metric]) -> None:
        experiment_id = experiment.experiment_id
        totals = {row["variant"]: row for row in variant_totals(self.engine, experiment_id)}
        for v in experiment.variants:
            row = totals.get(v.name, {})
            for name in ("invocations", "conversions", "errors"):
                f[name].add_metric([experiment_id, v.name], float(row.get(name, 0)))
        report = build_report(load_report_input(self.engine, experiment_id))
        for row in report["variants"]:  # the weight in force: the newest allocation's, or the initial one
            f["weight"].add_metric([experiment_id, row["variant"]], float(row["weight"]))
            f["units"].add_metric([experiment_id, row["variant"]], float(row.get("units") or 0))
        verdict = report["decision"]["verdict"]
        for candidate in VERDICTS:
            f["decision"].add_metric([experiment_id, candidate], 1.0 if candidate == verdict else 0.0)
        for row in report["comparisons"]:
            if row["role"] == "primary" and row.get("always_valid_low") is not None:
                labels = [experiment_id, row["variant"], row["metric"]]
                f["difference"].add_metric(labels, row["difference"])
                f["low"].add_metric(labels, row["always_valid_low"])
                f["high"].add_metric(labels, row["always_valid_high"])
        for row in report["guardrails"]:
            f["harm"].add_metric([experiment_id, row["variant"], row["metric"]], 1.0 if row.get("harmful") else 0.0)
        if report["sample_ratio"].get("p_value") is not None:
            f["ratio"].add_metric([experiment_id], report["sample_ratio"]["p_value"])
        if experiment.config.get("rollout"):
            with self.engine.raw_connection() as raw:
                current = rollout_status(raw.driver_connection, experiment_id, transitions=0)
            if current["percent"] is not None:
                f["stage"].add_metric([experiment_id], current["percent"])
            for candidate in ROLLOUT_STATES:
                f["state"].add_metric([experiment_id, candidate], 1.0 if candidate == current["state"] else 0.0)

"""Read a ``ReportInput`` from PostgreSQL: the I/O partner of the pure ``build``."""

from __future__ import annotations

from sqlalchemy import Engine

from abflow.core.config import parse_config
from abflow.core.windowing import LATENCY_BUCKETS
from bandit_service.report.build import ReportInput
from bandit_service.stats.adaptive import period_starts
from storage import queries
from storage.registry import get_experiment


def load_report_input(engine: Engine, experiment_id: str) -> ReportInput:
    """Read what the report needs; raises ``ExperimentNotFound`` for an unknown experiment."""
    experiment = get_experiment(engine, experiment_id)
    config = parse_config(experiment.config)
    allocations = queries.allocation_versions(engine, experiment_id)
    starts = period_starts(config.normalised_weights, [(at, weights) for _, at, weights in allocations])
    periods: dict[int, dict[str, dict]] = {}
    for row in queries.period_sums(engine, experiment_id, starts):
        periods.setdefault(row.pop("period"), {})[row.pop("variant")] = row
    return ReportInput(config=config, status=experiment.status, periods=periods, allocations=allocations,
                       histograms=queries.latency_histograms(engine, experiment_id, LATENCY_BUCKETS),
                       assignments=queries.assignment_counts(engine, experiment_id),
                       series=queries.time_series(engine, experiment_id),
                       shadows=queries.shadow_totals(engine, experiment_id, LATENCY_BUCKETS))

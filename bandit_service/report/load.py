"""Read a ``ReportInput`` from PostgreSQL: the I/O partner of the pure ``build``."""

from __future__ import annotations

from sqlalchemy import Engine

from abflow.core.config import ExperimentConfig, parse_config
from abflow.core.windowing import LATENCY_BUCKETS
from bandit_service.report.build import ReportInput
from bandit_service.report.evidence import BASE_VARIABLES, UnitMoments, metric_pairs, metric_variables
from bandit_service.stats.adaptive import period_starts, pooled
from storage import queries, units
from storage.registry import get_experiment


def load_report_input(engine: Engine, experiment_id: str) -> ReportInput:
    """Read what the report needs; raises ``ExperimentNotFound`` for an unknown experiment."""
    experiment = get_experiment(engine, experiment_id)
    config = parse_config(experiment.config)
    allocations = queries.allocation_versions(engine, experiment_id)
    starts = period_starts(config.normalised_weights, [(at, weights) for _, at, weights in allocations])
    variables, pairs = unit_variables(config)
    unit_rows, exposures, attribution = units.read_units(
        engine, experiment_id, variables, pairs, [at.timestamp() for at in starts],
        [at.timestamp() for _, at, _ in allocations])
    periods: dict[int, dict[str, dict]] = {}
    for row in queries.period_sums(engine, experiment_id, starts):
        periods.setdefault(row.pop("period"), {})[row.pop("variant")] = row
    return ReportInput(config=config, status=experiment.status, periods=periods, allocations=allocations,
                       histograms=queries.latency_histograms(engine, experiment_id, LATENCY_BUCKETS),
                       units=moments_by_period(unit_rows, list(variables), pairs),
                       exposures={(k, variant): n for variant, k, n in exposures},
                       attribution=attribution,
                       series=queries.time_series(engine, experiment_id),
                       shadows=queries.shadow_totals(engine, experiment_id, LATENCY_BUCKETS))


def unit_variables(config: ExperimentConfig) -> tuple[dict[str, tuple], list[tuple[str, str]]]:
    """The per-unit variables and products an experiment's report (or rollout) reads."""
    variables, pairs = dict(BASE_VARIABLES), []
    for metric in config.metrics:
        variables.update(metric_variables(metric))
        pairs += metric_pairs(metric)
    return variables, pairs


def moments_by_period(rows: list[tuple], names: list[str], pairs: list[tuple[str, str]]
                      ) -> dict[int, dict[str, UnitMoments]]:
    """``storage.units.unit_moments`` rows as ``UnitMoments`` per allocation period and variant."""
    found: dict[int, dict[str, UnitMoments]] = {}
    for variant, period, n, multiple, *moments in rows:
        sums = dict(zip(names, (float(v) for v in moments[:len(names)])))
        products = {}
        for (a, b), value in zip(pairs, moments[len(names):]):
            products[(a, b)] = products[(b, a)] = float(value)
        found.setdefault(int(period), {})[variant] = UnitMoments(int(n), int(multiple), sums, products)
    return found


def moments_by_variant(rows: list[tuple], names: list[str], pairs: list[tuple[str, str]]) -> dict[str, UnitMoments]:
    """The same rows added up per variant."""
    return pooled(list(moments_by_period(rows, names, pairs).values()))

"""Benchmark of the experiment report on a long experiment.

    python bench/report.py [--days 365] [--variants 5] [--units 1000000] [--repeats 3]

Writes --days of one-minute windows for --variants variants (a year and five
variants: 2.6 million rows with their latency histograms), an allocation
version every hour whose weights wander, as a bandit's would, and --units
exposed units (each exposed at a random minute to a variant drawn from the
weights of that hour, with 1 + Poisson(2) invocations). The experiment has
five metrics: converted_units (primary), conversion_rate and reward_per_unit
(secondary), error_rate and latency_p95 (guardrails). Then, in the same run,
times (median of --repeats):

- baseline: reading the unit rows from PostgreSQL into Python (psycopg, one query);
- report: everything `abflow report` does (its queries, the statistics, the
  decision), and separately rendering the terminal text and the HTML page.

Uses ABFLOW_DATABASE_URL when set, else an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import psycopg
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import save_results  # noqa: E402

from abflow.core.config import parse_config  # noqa: E402
from abflow.core.windowing import LATENCY_BUCKET_EDGES_MS, LATENCY_BUCKETS  # noqa: E402
from abflow.local.stack import EmbeddedPostgres  # noqa: E402
from abflow.settings import Settings, libpq_url  # noqa: E402
from bandit_service.report.build import build_report  # noqa: E402
from bandit_service.report.load import load_report_input  # noqa: E402
from bandit_service.report.render import render_html, render_text  # noqa: E402
from storage.db import make_engine, upgrade  # noqa: E402
from storage.registry import create_experiment  # noqa: E402

START = datetime(2025, 1, 1, tzinfo=timezone.utc)
COLUMNS = ("experiment_id", "variant", "window_start", "window_seconds", "invocations", "conversions", "reward_sum",
           "reward_sq_sum", "errors", "latency_count", "latency_ms_sum", "latency_hist")


def latency_shares() -> np.ndarray:
    """Bucket probabilities of a log-normal latency around 40 ms."""
    edges = np.array(list(LATENCY_BUCKET_EDGES_MS) + [np.inf])
    from scipy import stats

    cdf = stats.lognorm.cdf(edges, s=0.5, scale=40.0)
    return np.diff(np.concatenate([[0.0], cdf]))


METRICS = [{"name": "converted_units", "role": "primary"}, {"name": "conversion_rate", "role": "secondary"},
           {"name": "reward_per_unit", "role": "secondary"}, {"name": "error_rate", "role": "guardrail"},
           {"name": "latency_p95", "role": "guardrail"}]


def write_experiment(database_url: str, engine, days: int, variants: int, units: int, seed: int) -> str:
    experiment_id = f"bench-report-{uuid.uuid4().hex[:6]}"
    names = [f"model-{i}" for i in range(variants)]
    create_experiment(engine, parse_config({
        "experiment_id": experiment_id, "strategy": "ThompsonSampling", "min_weight": 0.02, "metrics": METRICS,
        "variants": [{"name": n, "role": "champion" if i == 0 else "challenger", "initial_weight": 1.0}
                     for i, n in enumerate(names)],
    }))
    rng = np.random.default_rng(seed)
    minutes = days * 24 * 60
    hours = days * 24
    # Hourly weights: a random walk on the logits, floored like the bandit's min_weight.
    logits = np.cumsum(rng.normal(0, 0.15, (hours, variants)), axis=0)
    weights = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    weights = 0.02 + (1 - 0.02 * variants) * weights
    rates = 0.05 + 0.002 * np.arange(variants)
    shares = latency_shares()
    with psycopg.connect(libpq_url(database_url)) as conn:
        with conn.cursor() as cur:
            for hour in range(hours):
                cur.execute(
                    "INSERT INTO allocations (experiment_id, version, strategy, phase, weights, statistics, computed_at)"
                    " VALUES (%s, %s, 'ThompsonSampling', 'ThompsonSampling', %s, '{}', %s)",
                    (experiment_id, hour + 1, json.dumps(dict(zip(names, weights[hour].tolist()))),
                     START + timedelta(hours=hour)))
        with conn.cursor() as cur, cur.copy(f"COPY variant_windows ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            bar = tqdm(total=minutes * variants, unit="row", desc="writing windows", mininterval=1)
            for day in range(days):
                block = slice(day * 1440, (day + 1) * 1440)
                hour_of = np.arange(block.start, block.stop) // 60
                traffic = rng.poisson(100, 1440)
                for v, name in enumerate(names):
                    n = rng.binomial(traffic, weights[hour_of, v])
                    conversions = rng.binomial(n, rates[v])
                    errors = rng.binomial(n, 0.01)
                    hists = rng.multinomial(n, shares)
                    for m in range(1440):
                        copy.write_row((experiment_id, name, START + timedelta(minutes=day * 1440 + m), 60, int(n[m]),
                                        int(conversions[m]), float(conversions[m]), float(conversions[m]),
                                        int(errors[m]), int(n[m]), float(n[m]) * 40.0, hists[m].tolist()))
                    bar.update(1440)
            bar.close()
        write_units(conn, experiment_id, names, weights, rates, units, rng)
        conn.commit()
    assert len(shares) == LATENCY_BUCKETS
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE variant_windows")
        conn.execute("VACUUM ANALYZE unit_state")
    return experiment_id


def write_units(conn, experiment_id: str, names: list[str], weights: np.ndarray, rates: np.ndarray, units: int,
                rng) -> None:
    """Units exposed at random minutes, each to a variant drawn from that hour's weights."""
    minute = np.sort(rng.integers(0, len(weights) * 60, units))
    cumulative = np.cumsum(weights[minute // 60], axis=1)
    variant = np.minimum((rng.random(units)[:, None] > cumulative).sum(axis=1), len(names) - 1)
    visits = 1 + rng.poisson(2, units)
    conversions = rng.binomial(visits, rates[variant])
    errors = rng.binomial(visits, 0.01)
    exposed = START.timestamp() + minute * 60.0 + rng.uniform(0, 60, units)
    with conn.cursor() as cur, cur.copy(
            "COPY unit_state (experiment_id, unit_id, variant, exposed_at, propensity, invocations, "
            "conversions, reward, errors) FROM STDIN") as copy:
        for i in tqdm(range(units), unit="unit", desc="writing units", mininterval=1):
            copy.write_row((experiment_id, f"user-{i}", names[variant[i]], float(exposed[i]), None,
                            float(visits[i]), float(conversions[i]),
                            float(conversions[i]), float(errors[i])))


def time_it(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--variants", type=int, default=5)
    parser.add_argument("--units", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    database_url = Settings.from_env().database_url
    postgres = None
    home = Path(tempfile.mkdtemp(prefix="abflow-bench-report-"))
    if not database_url:
        postgres = EmbeddedPostgres(home / "pgdata", home / "postgres.log").start()
        database_url = postgres.url
    try:
        upgrade(database_url)
        engine = make_engine(database_url)
        started = time.perf_counter()
        experiment_id = write_experiment(database_url, engine, args.days, args.variants, args.units, args.seed)
        written = time.perf_counter() - started

        def read_rows():
            with psycopg.connect(libpq_url(database_url)) as conn:
                return conn.execute("SELECT variant, exposed_at, invocations, conversions, reward, errors"
                                    " FROM unit_state WHERE experiment_id = %s", (experiment_id,)).fetchall()

        print(f"timing: reading the rows, the report, rendering ({args.repeats} times each)", file=sys.stderr)
        read_s, rows = time_it(read_rows, args.repeats)
        report_s, report = time_it(lambda: build_report(load_report_input(engine, experiment_id)), args.repeats)
        input_s, _ = time_it(lambda: load_report_input(engine, experiment_id), args.repeats)
        text_s, _ = time_it(lambda: render_text(report), args.repeats)
        html_s, page = time_it(lambda: render_html(report), args.repeats)
        engine.dispose()
        results = {
            "units": len(rows), "windows": args.days * 1440 * args.variants, "days": args.days,
            "variants": args.variants, "metrics": len(METRICS),
            "allocation_versions": args.days * 24, "allocation_periods": report["experiment"]["allocation_periods"],
            "write_s": round(written, 1),
            "baseline_read_unit_rows_s": round(read_s, 3),
            "report_s": round(report_s, 3),
            "report_queries_s": round(input_s, 3),
            "report_statistics_s": round(report_s - input_s, 3),
            "report_over_read": round(report_s / read_s, 3),
            "render_text_s": round(text_s, 3),
            "render_html_s": round(html_s, 3),
            "html_bytes": len(page),
            "decision": report["decision"]["verdict"],
        }
        save_results("report", results)
    finally:
        if postgres:
            postgres.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()

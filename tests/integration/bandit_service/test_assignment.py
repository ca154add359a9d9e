"""Sticky assignment: hashing uniformity and stability, concurrency, restarts, lifecycle."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Jsonb
from scipy import stats

from abflow.core.buckets import choose, hash_point
from abflow.core.config import parse_config
from abflow.core.errors import ExperimentNotFound
from abflow.settings import libpq_url
from storage.registry import create_experiment
from tests.helpers import Assigner


def test_hash_points_are_uniform_and_stable():
    points = np.array([hash_point("exp", f"user-{i}") for i in range(50_000)])
    # Kolmogorov-Smirnov against U(0, 1): a broken hash fails this by miles.
    assert stats.kstest(points, "uniform").pvalue > 0.001
    assert hash_point("exp", "user-7") == hash_point("exp", "user-7")
    # Salted by experiment: a user's position in one experiment says nothing about another.
    other = np.array([hash_point("other-exp", f"user-{i}") for i in range(50_000)])
    assert abs(np.corrcoef(points, other)[0, 1]) < 0.02
    assert hash_point("exp", "u", salt="a") != hash_point("exp", "u", salt="b")


def test_choose_splits_by_weight():
    weights = {"A": 0.2, "B": 0.3, "C": 0.5}
    counts = Counter(choose(weights, hash_point("split", f"u{i}")) for i in range(60_000))
    observed = [counts[name] for name in weights]
    expected = [60_000 * w for w in weights.values()]
    assert stats.chisquare(observed, expected).pvalue > 0.001
    assert choose({"A": 0.0, "B": 1.0}, 0.0) == "B"  # a zero weight never wins
    assert choose({"A": 0.5, "B": 0.5}, 0.999999999) == "B"
    with pytest.raises(ValueError):
        choose({"A": 0.0}, 0.5)


@pytest.fixture
def conn(stack):
    with psycopg.connect(libpq_url(stack.database_url), autocommit=True) as connection:
        yield connection


@pytest.fixture
def assigned(stack):
    assigner = Assigner(stack.database_url)
    yield assigner
    assigner.close()


def new_experiment(engine, strategy="ThompsonSampling") -> str:
    experiment_id = f"assign-{uuid.uuid4().hex[:8]}"
    create_experiment(engine, parse_config({
        "experiment_id": experiment_id, "strategy": strategy,
        "variants": [{"name": "Champion", "initial_weight": 0.5}, {"name": "Challenger", "initial_weight": 0.5}],
    }))
    return experiment_id


def test_first_assignment_is_stored_and_returned_from_then_on(engine, conn, assigned, stack):
    experiment_id = new_experiment(engine)
    first = assigned(experiment_id, "user-1")
    assert first.new and first.propensity == 0.5 and first.allocation_version is None
    # The weights move; the user stays where they were, with the propensity logged at the time.
    conn.execute("INSERT INTO allocations (experiment_id, version, strategy, phase, weights, statistics) "
                 "VALUES (%s, 1, 'ThompsonSampling', 'ThompsonSampling', %s, '{}')",
                 (experiment_id, Jsonb({"Champion": 0.1, "Challenger": 0.9})))
    after_restart = Assigner(stack.database_url)
    again = after_restart(experiment_id, "user-1")
    after_restart.close()
    assert (again.variant, again.propensity, again.new) == (first.variant, 0.5, False)
    # New users follow the new weights.
    newcomers = Counter(assigned(experiment_id, f"new-{i}").variant for i in range(400))
    assert newcomers["Challenger"] > 300
    assert {assigned(experiment_id, f"new-{i}").allocation_version for i in range(5)} == {1}


def test_concurrent_first_requests_get_one_answer(engine, stack):
    experiment_id = new_experiment(engine)
    results, errors = [], []
    barrier = threading.Barrier(16)

    def request() -> None:
        try:
            assigner = Assigner(stack.database_url)
            try:
                barrier.wait()
                results.append(assigner(experiment_id, "contended-user"))
            finally:
                assigner.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({(r.variant, r.propensity) for r in results}) == 1
    assert sum(r.new for r in results) == 1  # exactly one request stored it
    with psycopg.connect(libpq_url(stack.database_url)) as check:
        assert check.execute("SELECT count(*) FROM assignments WHERE experiment_id = %s",
                             (experiment_id,)).fetchone()[0] == 1


def test_paused_stopped_and_removed_variants(engine, conn, assigned):
    experiment_id = new_experiment(engine)
    kept = assigned(experiment_id, "early-user")
    conn.execute("UPDATE experiments SET status = 'paused' WHERE experiment_id = %s", (experiment_id,))
    assert assigned(experiment_id, "early-user").variant == kept.variant  # sticky while paused
    late = assigned(experiment_id, "late-user")
    assert (late.variant, late.stored) == ("Champion", False)
    conn.execute("UPDATE experiments SET status = 'stopped' WHERE experiment_id = %s", (experiment_id,))
    assert {assigned(experiment_id, u).variant for u in ("early-user", "late-user")} == {"Champion"}

    conn.execute("UPDATE experiments SET status = 'running' WHERE experiment_id = %s", (experiment_id,))
    users = [f"u{i}" for i in range(40)]
    before = {u: assigned(experiment_id, u).variant for u in users}
    conn.execute("DELETE FROM variants WHERE experiment_id = %s AND name = 'Challenger'", (experiment_id,))
    after = {u: assigned(experiment_id, u) for u in users}
    assert all(a.variant == "Champion" for a in after.values())
    assert all(after[u].new for u in users if before[u] == "Challenger")  # re-assigned, explicitly
    with pytest.raises(ExperimentNotFound):
        assigned("no-such-experiment", "u")

"""The exposures a worker met: found as they were added, bounded, never wrong (no database needed)."""

from __future__ import annotations

import random

import numpy as np

from abflow.core.attribution import Exposure
from stream_jobs.checkpoint import Digests
from stream_jobs.exposures import KnownExposures


def test_what_was_added_is_found_as_it_was_before_and_after_it_joins_the_arrays():
    known = KnownExposures(recent_max=3)
    first = {("exp", "u1"): Exposure("A", 1.5, 0.25), ("exp", "u2"): Exposure("B", 2.0, None)}
    known.add(first)
    assert known.find([("exp", "u1"), ("exp", "u2"), ("exp", "u3")]) == first  # still in the dict
    second = {("exp", "u3"): Exposure("B", 3.0, 1.0), ("other", "u1"): Exposure("A", 4.0, None)}
    known.add(second)  # four: they join the arrays
    assert len(known) == 4
    assert known.find([("exp", "u1"), ("exp", "u2"), ("exp", "u3"), ("other", "u1"), ("other", "u2")]) == \
        {**first, **second}
    assert known.find([]) == {}


def test_a_random_history_agrees_with_a_dict_and_stays_within_its_bound():
    """Adds of new units (as the sink learns them), finds of any; past the bound the oldest are
    forgotten, but a unit found is always found with its own exposure."""
    rng = random.Random(7)
    known = KnownExposures(max_units=3_000, recent_max=500)
    truth: dict = {}
    for batch in range(40):
        new = {}
        for _ in range(rng.randrange(50, 300)):
            key = (f"exp-{rng.randrange(3)}", f"user-{len(truth) + len(new)}")
            new[key] = Exposure(rng.choice(["A", "B", "C"]), rng.uniform(0, 1e9),
                                rng.choice([None, rng.uniform(0.01, 1)]))
        known.add(new)
        truth.update(new)
        asked = rng.sample(sorted(truth), min(len(truth), 400)) + [("exp-0", "never")]
        found = known.find(asked)
        assert all(found[key] == truth[key] for key in found)
        assert len(known) <= 3_000 + 500
        recent = list(new)  # the newest batch is never the one forgotten
        assert known.find(recent) == new, batch
    assert len(known.find(truth)) < len(truth)  # some were forgotten: the bound held


def test_digests_sharing_their_first_half_are_told_apart():
    first = np.array([1, 5, 5, 5, 9], dtype=np.uint64)
    second = np.array([7, 1, 2, 3, 7], dtype=np.uint64)
    held = Digests(first, second)
    probe_first = np.array([5, 5, 5, 5, 9, 2], dtype=np.uint64)
    probe_second = np.array([1, 3, 2, 4, 7, 7], dtype=np.uint64)
    assert held.index_of(probe_first, probe_second).tolist() == [1, 3, 2, -1, 4, -1]
    assert Digests(first[:0], second[:0]).index_of(probe_first, probe_second).tolist() == [-1] * 6

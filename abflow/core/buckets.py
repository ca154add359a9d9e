"""Where a unit falls: salted hashing to a point in [0, 1), a variant on cumulative weights, and
the bucket ranges of layers. Pure: the SDK and the server place every unit identically with it.

The point ``hash(salt, experiment, unit)`` picks a variant on the cumulative weights. The point
``hash(salt, "layer", layer, unit)`` puts every unit in one of ``LAYER_BUCKETS`` buckets; each
experiment of a layer holds its own range of buckets.
"""

from __future__ import annotations

import hashlib

DEFAULT_SALT = "abflow"
LAYER_BUCKETS = 10_000


def hash_point(experiment_id: str, unit_id: str, salt: str = DEFAULT_SALT) -> float:
    """A uniform point in [0, 1), the same for the same inputs in every process."""
    digest = hashlib.blake2b(f"{salt}\x1f{experiment_id}\x1f{unit_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def layer_bucket(layer: str, unit_id: str, salt: str = DEFAULT_SALT) -> int:
    """The unit's bucket in the layer, in [0, LAYER_BUCKETS)."""
    return int(hash_point(f"layer\x1f{layer}", unit_id, salt) * LAYER_BUCKETS)


def layer_size(traffic: float) -> int:
    """The number of buckets an experiment taking ``traffic`` (a share of the layer's units) holds."""
    return max(1, min(LAYER_BUCKETS, round(traffic * LAYER_BUCKETS)))


def free_range(taken: list[tuple[int, int]], size: int, prefer: tuple[int, int] | None = None
               ) -> tuple[int, int] | None:
    """The first free range of ``size`` buckets beside the ``taken`` ones, or ``prefer`` when it is
    free (a promoted experiment's next version keeps its users); None when nothing fits."""
    def free(start: int, end: int) -> bool:
        return 0 <= start and end <= LAYER_BUCKETS and all(end <= s or e <= start for s, e in taken)

    if prefer is not None and prefer[1] - prefer[0] == size and free(*prefer):
        return prefer
    start = 0
    for s, e in sorted(taken):
        if s - start >= size:
            break
        start = max(start, e)
    return (start, start + size) if LAYER_BUCKETS - start >= size else None


def choose(weights: dict[str, float], point: float) -> str:
    """The variant whose slice of the cumulative weights holds ``point`` (weights in declared order)."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("weights must not all be zero")
    target = point * total
    running = 0.0
    chosen: str | None = None
    for name, weight in weights.items():
        if weight <= 0:
            continue
        chosen = name
        running += weight
        if target < running:
            return name
    assert chosen is not None  # some weight is positive, checked above
    return chosen  # rounding at the top end: the last variant with weight

"""Window maths and the latency histogram's buckets. Pure functions."""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds (inclusive) of the latency buckets in milliseconds; one more
# bucket after the last edge holds everything slower. 1-2-2.5-3-4-5-6-8 steps
# keep a percentile read from the histogram within one step (<= 33 %) of the truth.
LATENCY_BUCKET_EDGES_MS: tuple[float, ...] = tuple(
    round(m * 10**e, 6) for e in range(0, 5) for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)
) + (100_000.0,)
LATENCY_BUCKETS = len(LATENCY_BUCKET_EDGES_MS) + 1


def window_start(epoch_seconds: float, window_seconds: int) -> int:
    """Start (epoch seconds) of the tumbling window, aligned to the epoch, that holds the instant."""
    return int(epoch_seconds // window_seconds) * window_seconds


def latency_bucket(latency_ms: float) -> int:
    """Index of the bucket of ``latency_ms``: bucket i holds (edge[i-1], edge[i]]."""
    return bisect_left(LATENCY_BUCKET_EDGES_MS, latency_ms)


def histogram_quantile(counts: list[int], q: float) -> float | None:
    """The upper edge of the bucket that holds quantile ``q`` (a conservative estimate), None if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    total = sum(counts)
    if total == 0:
        return None
    rank = max(1, -(-q * total // 1))  # ceil(q * total), at least the first observation
    running = 0
    for index, count in enumerate(counts):
        running += count
        if running >= rank:
            return LATENCY_BUCKET_EDGES_MS[index] if index < len(LATENCY_BUCKET_EDGES_MS) else float("inf")
    return float("inf")

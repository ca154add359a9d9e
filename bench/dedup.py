"""The worker's dedup in steady state: what each event id costs once the horizon is full.

    python bench/dedup.py [--ids-per-s 1250] [--batch 1250] [--minutes 15]

Fills one partition's ``PartitionDedup`` with ``--minutes`` of ids at ``--ids-per-s`` (1,250 is
5,000 events/s over 4 partitions), then times, batch after batch, what the sink does with each:
look up which ids were counted, add the new ones, forget what left the horizon. The baseline, in
the same run on the same ids: a Python set of their digests, the fastest lookup in memory, at
about 93 bytes an id. Prints the time and the memory per id of each.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import save_results  # noqa: E402

from stream_jobs.dedup import PartitionDedup, _digest  # noqa: E402

MEASURED_BATCHES = 200


class DigestSet:
    """The baseline: the digests in a set, with the same calls as ``PartitionDedup`` (no expiry
    cost counted: it keeps everything)."""

    def __init__(self) -> None:
        self.digests: set[bytes] = set()

    def add(self, at: float, event_ids: list[str]) -> None:
        self.digests.update(map(_digest, event_ids))

    def seen_among(self, event_ids: list[str]) -> set[str]:
        return {event_id for event_id in event_ids if _digest(event_id) in self.digests}

    def expire(self, older_than: float) -> None:
        pass


def measure(make, args) -> dict:
    ids = (f"event-{n}" for n in range(10**12))
    batches_per_s = args.ids_per_s / args.batch
    horizon_s = args.minutes * 60
    tracemalloc.start()
    dedup, at = make(), 0.0
    for _ in range(int(horizon_s * batches_per_s)):
        dedup.add(at, [next(ids) for _ in range(args.batch)])
        at += 1 / batches_per_s
    held_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    held_ids = int(horizon_s * args.ids_per_s)
    spent = 0.0
    for _ in range(MEASURED_BATCHES):
        batch = [next(ids) for _ in range(args.batch)]
        started = time.perf_counter()
        dedup.seen_among(batch)
        dedup.add(at, batch)
        dedup.expire(at - horizon_s)
        spent += time.perf_counter() - started
        at += 1 / batches_per_s
    return {"us_per_id": round(spent / (MEASURED_BATCHES * args.batch) * 1e6, 2),
            "bytes_per_id_held": round(held_bytes / held_ids, 1), "ids_held": held_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids-per-s", type=float, default=1250.0, help="ids counted per second in the partition")
    parser.add_argument("--batch", type=int, default=1250, help="ids per batch")
    parser.add_argument("--minutes", type=float, default=15.0, help="the dedup horizon")
    args = parser.parse_args()
    results = {"ids_per_s": args.ids_per_s, "batch": args.batch, "minutes": args.minutes}
    for name, make in (("set_of_digests", DigestSet), ("partition_dedup", PartitionDedup)):
        results[name] = measure(make, args)
        print(f"{name}: {results[name]['us_per_id']} µs an id, {results[name]['bytes_per_id_held']} bytes an id held",
              file=sys.stderr, flush=True)
    save_results("dedup", results)


if __name__ == "__main__":
    main()

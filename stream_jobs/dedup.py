"""The event ids each partition counted within the dedup horizon, in memory: a batch's ids are
looked up here, not in PostgreSQL (``checkpoint`` reloads a partition's ids from there whenever
another writer may have added some)."""

from __future__ import annotations

import hashlib

import numpy as np

MINUTE_SECONDS = 60.0
RECENT_MAX_IDS = 16_384


def _digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=16).digest()


class Digests:
    """Digests sorted by their first 64-bit half, held as two arrays of halves: a search compares
    native integers, where numpy compares 16-byte strings about ten times slower. Two digests that
    share a first half (a chance of 2^-64 a pair) are told apart by looking at each."""

    def __init__(self, first: np.ndarray, second: np.ndarray):
        self.first, self.second = first, second

    @classmethod
    def of(cls, digests: list[bytes]) -> "Digests":
        halves = np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2)
        order = np.argsort(halves[:, 0], kind="stable")
        return cls(halves[order, 0], halves[order, 1])

    def __len__(self) -> int:
        return len(self.first)

    def contains(self, probe: "Digests") -> np.ndarray:
        """For each digest of ``probe`` (sorted, so that each search starts where the last ended),
        whether it is here."""
        if not len(self.first):
            return np.zeros(len(probe), dtype=bool)
        at = np.minimum(np.searchsorted(self.first, probe.first), len(self.first) - 1)
        first_equal = self.first[at] == probe.first
        found = first_equal & (self.second[at] == probe.second)
        # A digest whose first half is shared may sit after the first one with that half.
        for i in np.flatnonzero(first_equal & ~found):
            run = slice(at[i], np.searchsorted(self.first, probe.first[i], "right"))
            found[i] = bool((self.second[run] == probe.second[i]).any())
        return found


class PartitionDedup:
    """The event ids one partition counted within the dedup horizon.

    Kept as 16-byte digests (blake2b) in one sorted array, each with the number of the minute it
    was counted in (a few bytes more an id; a string in a set costs several times that), and a
    batch's ids are looked up with one search of the whole horizon rather than one per minute
    (``bench/dedup.py``; README, Dedup in steady state). Two different ids share a digest with a
    chance of n / 2^128 (n: the ids held; at 5,000 events/s for 15 minutes, 1e-32 for each new
    id). A minute's ids are forgotten together once its newest batch is past the horizon (an id is
    remembered up to a minute longer than the horizon: a duplicate is still one). The newest ids
    wait in a set, which costs several times the array's bytes a digest, until RECENT_MAX_IDS of
    them or the end of their minute move them into the array: a worker catching up counts far
    more than a minute's worth of ids a minute."""

    def __init__(self) -> None:
        self._held = Digests(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64))
        self._minute_of = np.empty(0, dtype=np.uint32)  # per held digest, the number of its minute
        self._newest: dict[int, float] = {}  # per minute number, the time of its newest batch
        self._recent: set[bytes] = set()  # the newest ids, of the current minute
        self._minute = -1  # the current minute's number; -1 before the first batch
        self._minute_started = 0.0  # time of the current minute's first batch
        self._digested: dict[str, bytes] = {}  # the last batch looked up, for ``add`` not to digest it again

    def add(self, at: float, event_ids: list[str]) -> None:
        if not event_ids:
            return
        if self._minute < 0 or at - self._minute_started >= MINUTE_SECONDS:
            self._hold_recent()
            self._minute += 1
            self._minute_started = at
        digested = self._digested
        self._digested = {}
        self._recent.update([digested.get(event_id) or _digest(event_id) for event_id in event_ids])
        self._newest[self._minute] = max(self._newest.get(self._minute, at), at)
        if len(self._recent) >= RECENT_MAX_IDS:
            self._hold_recent()

    def _hold_recent(self) -> None:
        """Move the recent ids (all of the current minute) into the sorted array."""
        if not self._recent:
            return
        recent = Digests.of(list(self._recent))
        at = np.searchsorted(self._held.first, recent.first)
        self._held = Digests(np.insert(self._held.first, at, recent.first),
                             np.insert(self._held.second, at, recent.second))
        self._minute_of = np.insert(self._minute_of, at, np.uint32(self._minute))
        self._recent = set()

    def expire(self, older_than: float) -> None:
        gone = [minute for minute, newest in self._newest.items() if newest < older_than]
        if not gone:
            return
        for minute in gone:
            del self._newest[minute]
        if self._minute in gone:
            self._recent = set()
        keep = ~np.isin(self._minute_of, gone)
        self._held = Digests(self._held.first[keep], self._held.second[keep])
        self._minute_of = self._minute_of[keep]

    def seen_among(self, event_ids: list[str]) -> set[str]:
        """Those of ``event_ids`` this partition counted within the horizon."""
        digests = [_digest(event_id) for event_id in event_ids]
        self._digested = dict(zip(event_ids, digests))
        seen = {event_id for event_id, digest in zip(event_ids, digests) if digest in self._recent}
        if len(self._held) and digests:
            probe = Digests.of(digests)
            hit = self._held.contains(probe)
            held = {first.tobytes() + second.tobytes() for first, second in zip(probe.first[hit], probe.second[hit])}
            seen.update(event_id for event_id, digest in zip(event_ids, digests) if digest in held)
        return seen

    def __len__(self) -> int:
        return len(self._recent) + len(self._held)

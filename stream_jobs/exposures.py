"""The exposures a worker has met, so that a batch looks up in PostgreSQL only the units it has not.

An exposure never changes once made (``abflow.core.attribution``): one read from PostgreSQL, or
committed there by this worker, stays true whoever writes the unit's row later. So no check of who
else wrote is needed, unlike the dedup ids: a unit found here is exposed as found.

Compact: per unit a 16-byte digest of (experiment, unit) and the exposure's columns (variant as a
code, time, propensity), about 40 bytes, in arrays sorted by digest (``Digests``); the newest wait
in a dict until ``RECENT_MAX_UNITS`` of them join the arrays. At most ``max_units``: beyond, the
oldest half is forgotten (a unit forgotten is looked up again when it returns).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import numpy as np

from abflow.core.attribution import Exposure, UnitKey
from stream_jobs.checkpoint import Digests

RECENT_MAX_UNITS = 65_536
MAX_UNITS = 2_000_000  # about 80 MB


def _digest(key: UnitKey) -> bytes:
    # Ids are printable (no line breaks): the pair is unambiguous.
    return hashlib.blake2b(f"{key[0]}\n{key[1]}".encode(), digest_size=16).digest()


def _halves(digests: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(-1, 2)


class KnownExposures:
    def __init__(self, max_units: int = MAX_UNITS, recent_max: int = RECENT_MAX_UNITS):
        self.max_units = max_units
        self.recent_max = recent_max
        self.clear()

    def clear(self) -> None:
        empty = np.empty(0, dtype=np.uint64)
        self._held = Digests(empty, empty)
        self._variant = np.empty(0, dtype=np.int32)  # a code: self._names[code]
        self._exposed_at = np.empty(0, dtype=np.float64)
        self._propensity = np.empty(0, dtype=np.float64)  # NaN: none
        self._generation = np.empty(0, dtype=np.uint32)  # when it joined the arrays: the oldest go first
        self._recent: dict[bytes, Exposure] = {}
        self._names: list[str] = []
        self._codes: dict[str, int] = {}
        self._merges = 0

    def __len__(self) -> int:
        return len(self._held) + len(self._recent)

    def find(self, keys: Iterable[UnitKey]) -> dict[UnitKey, Exposure]:
        """The exposures of those of ``keys`` met before."""
        found: dict[UnitKey, Exposure] = {}
        missed: list[tuple[UnitKey, bytes]] = []
        for key in keys:
            digest = _digest(key)
            exposure = self._recent.get(digest)
            if exposure is not None:
                found[key] = exposure
            else:
                missed.append((key, digest))
        if missed and len(self._held):
            halves = _halves([digest for _, digest in missed])
            at = self._held.index_of(halves[:, 0], halves[:, 1])
            for (key, _), i in zip(missed, at.tolist()):
                if i >= 0:
                    propensity = float(self._propensity[i])
                    found[key] = Exposure(self._names[self._variant[i]], float(self._exposed_at[i]),
                                          None if math.isnan(propensity) else propensity)
        return found

    def add(self, exposures: Mapping[UnitKey, Exposure]) -> None:
        """Exposures read from PostgreSQL or committed there (never one of a transaction that may
        still roll back)."""
        for key, exposure in exposures.items():
            self._recent[_digest(key)] = exposure
        if len(self._recent) >= self.recent_max:
            self._merge()

    def _merge(self) -> None:
        digests = list(self._recent)
        exposures = list(self._recent.values())
        self._recent = {}
        halves = _halves(digests)
        order = np.argsort(halves[:, 0], kind="stable")
        first, second = halves[order, 0], halves[order, 1]
        variant = np.array([self._code(e.variant) for e in exposures], dtype=np.int32)[order]
        exposed_at = np.array([e.exposed_at for e in exposures], dtype=np.float64)[order]
        propensity = np.array([math.nan if e.propensity is None else e.propensity for e in exposures],
                              dtype=np.float64)[order]
        if len(self._held) + len(digests) > self.max_units:
            self._forget_oldest_half()
        self._merges += 1
        at = np.searchsorted(self._held.first, first)
        self._held = Digests(np.insert(self._held.first, at, first), np.insert(self._held.second, at, second))
        self._variant = np.insert(self._variant, at, variant)
        self._exposed_at = np.insert(self._exposed_at, at, exposed_at)
        self._propensity = np.insert(self._propensity, at, propensity)
        self._generation = np.insert(self._generation, at, np.uint32(self._merges))

    def _forget_oldest_half(self) -> None:
        keep = self._generation > np.median(self._generation) if len(self._generation) else slice(None)
        self._held = Digests(self._held.first[keep], self._held.second[keep])
        self._variant = self._variant[keep]
        self._exposed_at = self._exposed_at[keep]
        self._propensity = self._propensity[keep]
        self._generation = self._generation[keep]

    def _code(self, variant: str) -> int:
        code = self._codes.get(variant)
        if code is None:
            code = self._codes[variant] = len(self._names)
            self._names.append(variant)
        return code

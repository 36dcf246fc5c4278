"""A short-lived cache of DHT lookups, so that a burst of calls to one user costs one get.

Free of I/O: the caller passes the time. An entry is dropped when a call routed by it
fails at the home proxy (404, 408, 480, 503 or a timeout), so the next call looks again.
"""

from __future__ import annotations

from collections import OrderedDict

from .location import HomeBinding


class LookupCache:
    def __init__(self, ttl: float = 10.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, tuple[float, tuple[HomeBinding, ...]]] = OrderedDict()

    def get(self, aor: str, now: float) -> tuple[HomeBinding, ...] | None:
        """The cached live bindings of ``aor``, or None (a miss) when there are none."""
        entry = self._entries.get(aor)
        if entry is not None:
            stored_at, bindings = entry
            fresh = tuple(b for b in bindings if b.is_live(now))
            if now - stored_at < self.ttl and fresh:
                self.hits += 1
                return fresh
            del self._entries[aor]
        self.misses += 1
        return None

    def put(self, aor: str, bindings: tuple[HomeBinding, ...], now: float) -> None:
        if not bindings or self.ttl <= 0:
            return  # "not found" is not cached: the user may register any moment
        self._entries[aor] = (now, bindings)
        self._entries.move_to_end(aor)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, aor: str) -> None:
        self._entries.pop(aor, None)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

"""A cache of DHT lookups, so that calls to one user cost one get, not one each.

Free of I/O: the caller passes the time. An entry serves calls while its bindings are
live, for ``ttl`` seconds after it last served one (a hit refreshes it), and never longer
than ``max_age`` seconds after the lookup that filled it. It is dropped at once when a
call routed by it fails at the home proxy (404, 408, 480, 503 or no answer): the phone
may have moved, so the next call looks again (see ``proxy.router``'s stale retry).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .location import HomeBinding


@dataclass(slots=True)
class _Entry:
    stored_at: float
    used_at: float
    bindings: tuple[HomeBinding, ...]


class LookupCache:
    def __init__(
        self, ttl: float = 60.0, max_entries: int = 10_000, *, max_age: float | None = None
    ) -> None:
        """``max_age`` defaults to ten times ``ttl``."""
        self.ttl = ttl
        self.max_age = 10 * ttl if max_age is None else max_age
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def get(self, aor: str, now: float) -> tuple[HomeBinding, ...] | None:
        """The cached live bindings of ``aor``, or None (a miss) when there are none."""
        entry = self._entries.get(aor)
        if entry is not None:
            fresh = tuple(b for b in entry.bindings if b.is_live(now))
            if fresh and now - entry.used_at < self.ttl and now - entry.stored_at < self.max_age:
                self.hits += 1
                entry.used_at = now
                entry.bindings = fresh
                self._entries.move_to_end(aor)
                return fresh
            del self._entries[aor]
        self.misses += 1
        return None

    def put(self, aor: str, bindings: tuple[HomeBinding, ...], now: float) -> None:
        if not bindings or self.ttl <= 0:
            return  # "not found" is not cached: the user may register any moment
        self._entries[aor] = _Entry(now, now, bindings)
        self._entries.move_to_end(aor)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def drop(self, aor: str) -> None:
        self._entries.pop(aor, None)

    def retain(self, keep: Callable[[str, HomeBinding], bool]) -> int:
        """Keep only the bindings ``keep(aor, binding)`` approves (e.g. after the trust
        folder changed); returns how many went."""
        dropped = 0
        for aor, entry in list(self._entries.items()):
            kept = tuple(b for b in entry.bindings if keep(aor, b))
            dropped += len(entry.bindings) - len(kept)
            if kept:
                entry.bindings = kept
            else:
                del self._entries[aor]
        return dropped

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

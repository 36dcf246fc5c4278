"""The default location store: this site's bindings in a dict, lost when the process stops.

It implements ``proxy.location.LocationStore``; ``dht_adaptor.redis_store.RedisStore`` is
the persistent one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from proxy.location import Binding

__all__ = ["MemoryStore"]


class MemoryStore:
    """The default store: a dict, lost when the process stops."""

    def __init__(self) -> None:
        self._bindings: dict[str, tuple[Binding, ...]] = {}

    async def load(self, aor: str, now: float) -> list[Binding]:
        live = [b for b in self._bindings.get(aor, ()) if b.is_live(now)]
        if not live:
            self._bindings.pop(aor, None)
        return live

    async def save(self, aor: str, bindings: Sequence[Binding], now: float) -> None:
        live = tuple(b for b in bindings if b.is_live(now))
        if live:
            self._bindings[aor] = live
        else:
            self._bindings.pop(aor, None)

    async def aors(self) -> AsyncIterator[str]:
        for aor in list(self._bindings):
            yield aor

    async def close(self) -> None:
        self._bindings.clear()

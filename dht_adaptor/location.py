"""The location service seam: where the registrar keeps bindings and the proxy finds them.

A *binding* ties an address-of-record (AOR) to one contact URI until an absolute expiry
time (RFC 3261 §10). Times are wall-clock seconds (``time.time()``) passed in by the
caller, never read here, so that bindings survive a restart and tests can use a manual
clock.

Two backends implement :class:`LocationStore`: :class:`MemoryStore` (the default) and
``dht_adaptor.redis_store.RedisStore``. A later layer publishes the same bindings to the DHT.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class LocationError(Exception):
    """The location store could not be read or written (the proxy answers 5xx)."""


@dataclass(frozen=True, slots=True)
class Binding:
    aor: str  # normalized "sip:user@host" (see proxy.sip.uri.aor_of)
    contact: str  # the contact URI, as the phone sent it, without the name-addr brackets
    expires_at: float  # absolute wall-clock time
    q: float = 1.0
    call_id: str = ""
    cseq: int = 0
    # Where the REGISTER really came from, "transport:host:port" (RFC 3581/5626 flow):
    # requests for this contact go there, so phones behind NAT stay reachable.
    source: str = ""
    instance: str | None = None  # +sip.instance (RFC 5626)
    reg_id: int | None = None
    path: tuple[str, ...] = field(default=())  # Path header values (RFC 3327)
    registered_at: float = 0.0

    def remaining(self, now: float) -> int:
        """Whole seconds left, never negative (what the 200 OK's expires param says)."""
        return max(0, int(self.expires_at - now + 0.5))

    def is_live(self, now: float) -> bool:
        return self.expires_at > now


class LocationStore(Protocol):
    """Bindings per AOR. ``save`` replaces the whole set of an AOR atomically."""

    async def load(self, aor: str, now: float) -> list[Binding]:
        """Live bindings of ``aor`` (expired ones are never returned)."""
        ...

    async def save(self, aor: str, bindings: Sequence[Binding], now: float) -> None:
        """Replace the bindings of ``aor``; an empty sequence removes the AOR."""
        ...

    def aors(self) -> AsyncIterator[str]:
        """Every AOR that may have live bindings (callers still ``load`` to check)."""
        ...

    async def close(self) -> None: ...


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

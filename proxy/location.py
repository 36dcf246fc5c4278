"""What the proxy needs of a location service: the interfaces its adaptors implement.

* :class:`LocationStore` keeps this site's bindings per AOR (``dht_adaptor.location.
  MemoryStore``, ``dht_adaptor.redis_store.RedisStore``).
* :class:`BindingPublisher` hands every change of bindings to the overlay, and
  :class:`RemoteLocator` finds the home proxies of users registered at other sites
  (both ``dht_adaptor.adaptor.DhtAdaptor``).

Backends fail with :class:`LocationError` or :class:`LocationUnavailable`, members of the
SIP error family that answer 503 with Retry-After: the adaptors turn their own failures
(Redis errors, DHT timeouts) into these at their boundary, once.

Times are wall-clock seconds passed in by the caller, never read here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .sip.binding import Binding
from .sip.errors import ServiceUnavailable

__all__ = [
    "Binding",
    "BindingPublisher",
    "HomeBinding",
    "Located",
    "LocationError",
    "LocationStore",
    "LocationUnavailable",
    "Prepared",
    "RemoteLocator",
]


class LocationError(ServiceUnavailable):
    """The location store could not be read or written."""

    reason = "Location Store Unavailable"


class LocationUnavailable(ServiceUnavailable):
    """The overlay could not say where a user is (no node answered, or too late)."""

    reason = "Location Service Unavailable"


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


Prepared = TypeVar("Prepared")


class BindingPublisher(Protocol[Prepared]):
    """Where the registrar sends every change of bindings (the DHT adaptor).

    ``Prepared`` is the publisher's own form of a change, made ready (signed,
    size-checked) for the overlay.
    """

    def prepare(self, aor: str, bindings: Sequence[Binding], *, force: bool = False) -> Prepared:
        """Make the change ready before the 200 OK; raises a SipError (e.g. 403) if the
        overlay cannot take it."""
        ...

    def publish(self, prepared: Prepared) -> None:
        """Queue the prepared change (returns at once; the write follows)."""
        ...


class HomeBinding(Protocol):
    """A binding as the overlay knows it: which home proxy holds the phone."""

    @property
    def contact(self) -> str: ...

    @property
    def home(self) -> str: ...

    @property
    def site(self) -> str:
        """The name of the site that published it."""
        ...

    @property
    def key_id(self) -> str:
        """The id of the key that signed it (the member site)."""
        ...

    @property
    def q(self) -> float: ...

    @property
    def expires_at(self) -> float: ...

    def is_live(self, now: float) -> bool: ...


B = TypeVar("B", bound=HomeBinding, covariant=True)


@dataclass(frozen=True, slots=True)
class Located(Generic[B]):
    """What the overlay knows of an AOR."""

    bindings: tuple[B, ...]  # live and verified, from every site
    known: bool  # the overlay holds a record (maybe only tombstones: registered lately)


class RemoteLocator(Protocol):
    """Finds users registered at other sites (the DHT adaptor)."""

    @property
    def home(self) -> str:
        """This site's own home proxy URI (bindings naming it are ours)."""
        ...

    def clock(self) -> float: ...

    async def locate(self, aor: str) -> Located[HomeBinding]:
        """The bindings of ``aor`` from every site; raises LocationUnavailable."""
        ...

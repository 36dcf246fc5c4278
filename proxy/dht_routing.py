"""Routing to other sites through the DHT (the P2P-SIP part of the proxy).

An out-of-dialog request for a user with no binding here is looked up in the DHT. Each
binding names its *home proxy*, the site where the phone registered; the request goes
to every home proxy found, in parallel, and each of them delivers it over the flow it
holds with the phone (as with a Path header, RFC 3327), so phones behind NAT stay
reachable and only their own site ever sends to them.

A request relayed to a home proxy carries ``;p2psip=home`` in its Request-URI. A proxy
that receives one delivers it to local bindings only: it never goes back into the DHT,
so two sites cannot bounce a request between them.

The router answers with data (the home proxies to try, the Request-URI to send them);
the proxy resolves and forks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .location import HomeBinding, RemoteLocator
from .lookup_cache import LookupCache
from .sip.errors import ParseError
from .sip.headers import parse_name_addr
from .sip.uri import SipUri
from .sites import SiteDirectory
from .stats import SipCounters

log = logging.getLogger(__name__)

RELAY_PARAM = "p2psip"
RELAY_VALUE = "home"


def is_relayed(ruri: object) -> bool:
    """Did this request come from another site's proxy (through the DHT)?"""
    return isinstance(ruri, SipUri) and ruri.param(RELAY_PARAM) == RELAY_VALUE


def relayed_uri(ruri: SipUri) -> str:
    params = tuple(p for p in ruri.params if p[0].lower() != RELAY_PARAM)
    return str(ruri.with_params((*params, (RELAY_PARAM, RELAY_VALUE))))


@dataclass(frozen=True, slots=True)
class DhtRoute:
    """Where to send a request for a user registered at other sites."""

    aor: str
    request_uri: SipUri  # the Request-URI looked up
    ruri: str  # the Request-URI for every home proxy (marked as a relay)
    homes: tuple[SipUri, ...]  # best q first; empty when no other site holds the user
    from_cache: bool
    known: bool = True  # the overlay knows the AOR (maybe from tombstones only)
    home_names: tuple[str, ...] = ()  # the homes as the bindings write them (same order)


class DhtRouter:
    def __init__(
        self,
        locator: RemoteLocator,
        counters: SipCounters,
        *,
        cache_ttl: float = 60.0,
        sites: SiteDirectory | None = None,
    ) -> None:
        self.locator = locator
        self.home = locator.home
        self.cache = LookupCache(cache_ttl)
        self._counters = counters
        self._sites = sites

    async def route(self, aor: str, ruri: SipUri, *, fresh: bool = False) -> DhtRoute:
        """The home proxies of ``aor``'s bindings at other sites (maybe none).

        Raises LocationUnavailable when the DHT cannot answer.
        """
        now = self.locator.clock()
        bindings = None if fresh else self.cache.get(aor, now)
        from_cache = bindings is not None
        known = True
        if bindings is None:
            self._counters.dht_lookups += 1
            found = await self.locator.locate(aor)
            if self._sites is not None:
                self._sites.learn(found.bindings, now)
            bindings = tuple(b for b in found.bindings if b.home != self.home)
            known = found.known
            self.cache.put(aor, bindings, now)
        named = _homes(aor, bindings)
        return DhtRoute(
            aor, ruri, relayed_uri(ruri), tuple(uri for _, uri in named), from_cache, known,
            tuple(name for name, _ in named),
        )  # fmt: skip

    def failed(self, aor: str) -> None:
        """A call routed through the DHT failed at a home proxy: forget the entry."""
        self.cache.drop(aor)


def _homes(aor: str, bindings: Sequence[HomeBinding]) -> list[tuple[str, SipUri]]:
    # One branch per home proxy: the home forks to its own contacts of the user.
    best: dict[str, float] = {}
    for b in bindings:
        best[b.home] = max(best.get(b.home, 0.0), b.q)
    homes = []
    for home in sorted(best, key=lambda h: -best[h]):
        try:
            uri = parse_name_addr(f"<{home}>").uri
        except ParseError as exc:
            log.info("skipping home proxy %r of %s: %s", home, aor, exc)
            continue
        if isinstance(uri, SipUri):
            homes.append((home, uri))
    return homes

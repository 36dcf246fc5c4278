"""Routing to other sites through the DHT (the P2P-SIP part of the proxy).

An out-of-dialog request for a user with no binding here is looked up in the DHT. Each
binding names its *home proxy*, the site where the phone registered; the request goes
to every home proxy found, in parallel, and each of them delivers it over the flow it
holds with the phone (as with a Path header, RFC 3327), so phones behind NAT stay
reachable and only their own site ever sends to them.

A request relayed to a home proxy carries ``;p2psip=home`` in its Request-URI. A proxy
that receives one delivers it to local bindings only: it never goes back into the DHT,
so two sites cannot bounce a request between them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dht_adaptor.lookup_cache import LookupCache
from dht_adaptor.record import DhtBinding

from .sip.headers import parse_name_addr
from .sip.uri import SipUri

if TYPE_CHECKING:
    from dht_adaptor.adaptor import DhtAdaptor

    from .proxy_core import ProxyCore, Target

log = logging.getLogger(__name__)

RELAY_PARAM = "p2psip"
RELAY_VALUE = "home"
# A home proxy answering one of these (or not at all) may mean the cached binding is
# stale: the phone moved or its site went down. Drop the entry and look again once.
STALE_STATUSES = frozenset({404, 408, 480, 503})


def is_relayed(ruri: object) -> bool:
    """Did this request come from another site's proxy (through the DHT)?"""
    return isinstance(ruri, SipUri) and ruri.param(RELAY_PARAM) == RELAY_VALUE


def relayed_uri(ruri: SipUri) -> str:
    params = tuple(p for p in ruri.params if p[0].lower() != RELAY_PARAM)
    return str(ruri.with_params((*params, (RELAY_PARAM, RELAY_VALUE))))


@dataclass(frozen=True, slots=True)
class DhtRoute:
    targets: list[Target]
    from_cache: bool


class DhtRouter:
    def __init__(
        self,
        core: ProxyCore,
        adaptor: DhtAdaptor,
        home: str,
        *,
        cache_ttl: float = 10.0,
        lookup_timeout: float = 3.0,
    ) -> None:
        self.core = core
        self.adaptor = adaptor
        self.home = home
        self.cache = LookupCache(cache_ttl)
        self.lookup_timeout = lookup_timeout

    async def route(self, aor: str, ruri: SipUri, *, fresh: bool = False) -> DhtRoute | None:
        """Targets at the home proxies of ``aor``'s bindings, or None when it has none.

        Raises the adaptor's DhtError (or TimeoutError) when the DHT cannot answer.
        """
        now = self.adaptor.clock()
        bindings = None if fresh else self.cache.get(aor, now)
        from_cache = bindings is not None
        if bindings is None:
            self.core.server.stats.inc("dht_lookups")
            found = await asyncio.wait_for(self.adaptor.lookup(aor), self.lookup_timeout)
            bindings = tuple(b for b in found if b.home != self.home)
            self.cache.put(aor, bindings, now)
        targets = await self._targets(aor, ruri, bindings)
        if not targets:
            return None
        return DhtRoute(targets, from_cache)

    async def _targets(
        self, aor: str, ruri: SipUri, bindings: tuple[DhtBinding, ...]
    ) -> list[Target]:
        from .proxy_core import RoutingError, Target

        # One branch per home proxy: the home forks to its own contacts of the user.
        best: dict[str, float] = {}
        for b in bindings:
            best[b.home] = max(best.get(b.home, 0.0), b.q)
        uri = relayed_uri(ruri)
        targets = []
        for home in sorted(best, key=lambda h: -best[h]):
            try:
                hop = parse_name_addr(f"<{home}>").uri
                if not isinstance(hop, SipUri):
                    continue
                targets.append(Target(uri, await self.core.resolve(hop)))
            except (RoutingError, ValueError) as exc:
                log.info("skipping home proxy %s of %s: %s", home, aor, exc)
        return targets

    def failed(self, aor: str) -> None:
        """A call routed through the DHT failed at a home proxy: forget the entry."""
        self.cache.drop(aor)

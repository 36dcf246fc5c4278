"""Where a request for a URI goes: the flows to send it on (RFC 3263).

A domain with a static route (``--route``) goes to its peer; a Request-URI of any other
foreign domain goes to the outbound proxy when there is one; everything else is located
with DNS (:mod:`proxy.dns`: NAPTR, SRV, A/AAAA), giving the targets to fail over to in
order. A ``sips:`` URI or ``transport=tls`` is reached over TLS only, port 5061 unless
another is given (RFC 3263 §4.1).

A contact registered here is reached over the flow its REGISTER came from when that is
what keeps a phone behind NAT reachable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .dns import DnsLocator, is_ip
from .sip.errors import SipError, UnsupportedUriScheme
from .sip.headers import parse_name_addr
from .sip.registrar import FlowFailed
from .sip.uri import SipUri
from .transport import Flow

__all__ = ["Resolver", "is_ip"]


class Resolver:
    def __init__(
        self,
        has_connection: Callable[[str, int], bool],
        *,
        locator: DnsLocator | None = None,
        routes: Iterable[tuple[str, SipUri]] = (),
        outbound_proxy: SipUri | None = None,
    ) -> None:
        """``locator``: RFC 3263 lookups (default: addresses only, no NAPTR/SRV);
        ``routes``: (domain, next hop) pairs tried before DNS; ``outbound_proxy``: the
        next hop of requests for every other foreign domain."""
        self._has_connection = has_connection
        self._locator = locator or DnsLocator(lookups=False)
        self._routes = {domain.lower().rstrip("."): hop for domain, hop in routes}
        self._outbound = outbound_proxy

    @property
    def transports(self) -> Sequence[str]:
        return self._locator.transports

    async def resolve(self, uri: SipUri) -> Flow:
        """The flow to send to: the first of :meth:`resolve_all`."""
        return (await self.resolve_all(uri))[0]

    async def resolve_all(self, uri: SipUri) -> list[Flow]:
        """The flows for a next hop (a Route, a home proxy), best first: its static route,
        else RFC 3263. The ones after the first are for failover (§4.3)."""
        if type(self).resolve is not Resolver.resolve:
            return [await self.resolve(uri)]  # a subclass decides each target (tests)
        return await self._locate(self._routes.get(_domain(uri), uri))

    async def resolve_request(self, uri: SipUri) -> list[Flow]:
        """The flows for a Request-URI with no Route left: a static route for its domain,
        else the outbound proxy, else RFC 3263."""
        if type(self).resolve is not Resolver.resolve:
            return [await self.resolve(uri)]
        hop = self._routes.get(_domain(uri)) or self._outbound
        return await self._locate(hop or uri)

    async def _locate(self, uri: SipUri) -> list[Flow]:
        transport = uri.transport
        if uri.scheme == "sips":
            # RFC 3261 §26.2.2: sips over "tcp" means TLS; over anything else, nothing.
            transport = "tls" if transport == "tcp" else transport
            if transport != "tls":
                raise SipError(status_code=503, reason=f"Transport {transport} Not For SIPS")
        if transport not in self._locator.transports:
            raise SipError(status_code=503, reason=f"Transport {transport} Not Supported")
        return await self._locator.locate(uri)

    def stats(self) -> dict[str, int]:
        locator = self._locator
        return {
            "dns_queries": locator.queries,
            "dns_query_failures": locator.failures,
            "dns_cache_hits": locator.cache.hits,
            "dns_cache_misses": locator.cache.misses,
        }

    async def flow_for_contact(self, contact: str, source: str | None) -> Flow:
        """The flow to a registered contact: its registration flow when we hold one."""
        uri = parse_name_addr(f"<{contact}>").uri
        if not isinstance(uri, SipUri):
            raise UnsupportedUriScheme(f"cannot reach a {uri.scheme} contact")
        return await self.via_flow(source, uri)

    def outbound_flow(self, source: str) -> Flow:
        """RFC 5626 §5.3: a binding registered with outbound is reached over the flow it
        registered on, or not at all (430): never by connecting to its Contact."""
        flow = Flow.parse(source)
        if flow.reliable and not self._has_connection(flow.host, flow.port):
            raise FlowFailed(f"the connection {source} is gone")
        return flow

    async def via_flow(self, source: str | None, uri: SipUri) -> Flow:
        """The phone's own flow when we hold one (NAT-safe, RFC 5626 spirit), else the URI."""
        if source:
            flow = Flow.parse(source)
            if flow.transport == "udp":
                # A UDP source only helps a phone behind NAT, whose Contact names another
                # host than the REGISTER came from. A Contact on the source host says where
                # the phone listens (it may have registered from another port, or a third
                # party registered it): RFC 3261 §16.5 targets that contact.
                if uri.transport == "udp" and uri.host.strip("[]") != flow.host:
                    return flow
            elif self._has_connection(flow.host, flow.port):
                return flow
        return await self.resolve(uri)


def _domain(uri: SipUri) -> str:
    return uri.host.lower().rstrip(".")

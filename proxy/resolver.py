"""Where a request for a URI goes: the flow to send it on (RFC 3263, simplified).

A URI naming an IP address is used as is; a host name is looked up (A/AAAA) and cached.
A contact registered here is reached over the flow its REGISTER came from when that is
what keeps a phone behind NAT reachable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable

from .sip.errors import ServiceUnavailable, SipError, UnsupportedUriScheme
from .sip.headers import parse_name_addr
from .sip.registrar import FlowFailed
from .sip.uri import SipUri
from .transport import Flow

DNS_TTL = 60.0
DNS_TIMEOUT = 5.0


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class Resolver:
    def __init__(self, has_connection: Callable[[str, int], bool]) -> None:
        self._has_connection = has_connection
        self._dns: dict[str, tuple[float, str]] = {}

    async def resolve(self, uri: SipUri) -> Flow:
        """RFC 3263, simplified: maddr or host, A/AAAA lookup, port 5060, transport param."""
        transport = uri.transport
        if uri.scheme == "sips" and transport == "tcp":
            transport = "tls"  # RFC 5630: SIPS over TCP is TLS
        if transport not in ("udp", "tcp", "tls"):
            raise SipError(status_code=503, reason=f"Transport {transport} Not Supported")
        host = (uri.param("maddr") or uri.host).strip("[]")
        port = uri.port or (5061 if transport == "tls" else 5060)
        if not is_ip(host):
            host = await self._lookup_host(host)
        return Flow(transport, host, port)

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

    async def _lookup_host(self, name: str) -> str:
        now = time.monotonic()
        cached = self._dns.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_DGRAM), DNS_TIMEOUT
            )
        except (OSError, TimeoutError):
            raise ServiceUnavailable(f"cannot resolve {name}", reason="DNS Lookup Failed") from None
        if not infos:
            raise ServiceUnavailable(f"no address for {name}", reason="DNS Lookup Failed")
        addr = str(infos[0][4][0])
        self._dns[name] = (now + DNS_TTL, addr)
        return addr

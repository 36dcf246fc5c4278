"""Locating SIP servers (RFC 3263): NAPTR, then SRV, then A/AAAA, with dnspython.

Where a request for a URI goes is an ordered list of flows (transport, address, port):
the first is tried, and the next ones are what RFC 3263 §4.3 fails over to. The ordering
is pure (:func:`naptr_services`, :func:`order_srv`, :func:`transport_for`); the queries go
through dnspython to the configured server (``dns_server``) or the system's, and their
answers are kept for their TTL, failures and empty answers for a short while, in a
bounded table (:class:`DnsCache`).

Without a configured server, host addresses come from ``getaddrinfo`` (so ``/etc/hosts``
and container names work as before) and NAPTR/SRV from the servers in resolv.conf.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from .sip.errors import ServiceUnavailable
from .sip.uri import SipUri
from .transport import Flow

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
# RFC 3263 §4.1: NAPTR services and SRV prefixes of each transport.
SERVICES = {"SIP+D2U": "udp", "SIP+D2T": "tcp", "SIPS+D2T": "tls"}
SRV_PREFIX = {"udp": "_sip._udp", "tcp": "_sip._tcp", "tls": "_sips._tcp"}
# Our preference when a domain has no NAPTR records and SRV records for several
# transports (RFC 3263 §4.1 leaves it to the client).
SRV_PREFERENCE = ("udp", "tcp", "tls")
QUERY_TIMEOUT = 2.0  # seconds for one query, retries within it included
NEGATIVE_TTL = 30.0  # "no such record" is believed this long
FAILURE_TTL = 5.0  # a server that did not answer is asked again after this long
ADDRESS_TTL = 60.0  # getaddrinfo tells no TTL
MAX_TTL = 3600.0
MAX_TARGETS = 16  # flows one lookup yields, failover targets included
MAX_CACHED = 4096  # names (per record type) kept


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


# --- records and their order (pure) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Naptr:
    order: int
    preference: int
    flags: str
    service: str
    replacement: str


@dataclass(frozen=True, slots=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str


def transport_for(uri: SipUri) -> str | None:
    """The transport the URI itself decides (RFC 3263 §4.1), or None: ask DNS.

    A ``transport`` parameter decides; so does a numeric host or an explicit port (UDP,
    TLS for ``sips``). A ``sips`` URI is only ever reached over TLS."""
    explicit = uri.param("transport")
    if explicit:
        return "tls" if uri.scheme == "sips" and explicit.lower() == "tcp" else explicit.lower()
    host = uri.param("maddr") or uri.host
    if is_ip(host) or uri.port is not None:
        return "tls" if uri.scheme == "sips" else "udp"
    return None


def naptr_services(
    records: Iterable[Naptr], *, secure: bool, transports: Sequence[str]
) -> list[tuple[str, str]]:
    """(transport, SRV name) of the usable NAPTR records, best first (RFC 3263 §4.1):
    flag "s", a SIP service over a transport we speak (only SIPS+D2T for a sips URI),
    ordered by order, then preference."""
    usable = []
    for r in records:
        transport = SERVICES.get(r.service.upper())
        if transport is None or transport not in transports or r.flags.lower() != "s":
            continue
        if secure and transport != "tls":
            continue
        usable.append((r.order, r.preference, transport, r.replacement.rstrip(".")))
    usable.sort(key=lambda u: (u[0], u[1]))
    return [(transport, name) for _, _, transport, name in usable if name]


def order_srv(records: Iterable[Srv], randint: Callable[[int, int], int]) -> list[Srv]:
    """RFC 2782: lowest priority first; within a priority, a weighted random order
    (``randint(a, b)`` draws from a..b inclusive). Targets "." (no service) are left out."""
    by_priority: dict[int, list[Srv]] = {}
    for r in records:
        if r.target.rstrip("."):
            by_priority.setdefault(r.priority, []).append(r)
    ordered: list[Srv] = []
    for priority in sorted(by_priority):
        # Weight 0 first, as RFC 2782 says, so that they are picked only when drawn 0.
        group = sorted(by_priority[priority], key=lambda r: r.weight != 0)
        while group:
            total = sum(r.weight for r in group)
            pick = randint(0, total)
            running = 0
            for i, r in enumerate(group):
                running += r.weight
                if running >= pick:
                    ordered.append(group.pop(i))
                    break
            else:  # a draw out of range: take the first, never loop forever
                ordered.append(group.pop(0))
    return ordered


# --- the cache -------------------------------------------------------------------------


class DnsCache:
    """(name, type) -> records until they expire; bounded, the oldest entry goes first."""

    def __init__(self, clock: Callable[[], float], max_entries: int = MAX_CACHED) -> None:
        self._clock = clock
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, tuple[object, ...]]] = (
            OrderedDict()
        )
        self.hits = 0
        self.misses = 0

    def get(self, name: str, rdtype: str) -> tuple[object, ...] | None:
        entry = self._entries.get((name, rdtype))
        if entry is None or entry[0] <= self._clock():
            self.misses += 1
            return None
        self.hits += 1
        return entry[1]

    def put(self, name: str, rdtype: str, records: tuple[object, ...], ttl: float) -> None:
        key = (name, rdtype)
        self._entries.pop(key, None)
        while len(self._entries) >= self._max:
            self._entries.popitem(last=False)
        self._entries[key] = (self._clock() + min(ttl, MAX_TTL), records)

    def __len__(self) -> int:
        return len(self._entries)


# --- the locator -----------------------------------------------------------------------


class DnsLocator:
    """RFC 3263 §4: the ordered flows for a URI.

    ``server``: the DNS server (host, port) for every query; None: the system's
    (resolv.conf) for NAPTR/SRV and ``getaddrinfo`` for addresses. ``lookups=False``
    asks no NAPTR/SRV at all (addresses only, as before RFC 3263 support).
    ``families``: the address families we can send to (a socket on IPv4 only cannot
    reach an IPv6 address), in order of preference."""

    def __init__(
        self,
        *,
        server: tuple[str, int] | None = None,
        lookups: bool = True,
        transports: Sequence[str] = ("udp", "tcp"),
        families: Sequence[socket.AddressFamily] = (socket.AF_INET, socket.AF_INET6),
        clock: Callable[[], float] = time.monotonic,
        randint: Callable[[int, int], int] = random.randint,
        timeout: float = QUERY_TIMEOUT,
    ) -> None:
        self.transports = tuple(transports)
        self.families = tuple(families)
        self.cache = DnsCache(clock)
        self._randint = randint
        self._addresses_by_dns = server is not None
        self._resolver: dns.asyncresolver.Resolver | None = None
        self.queries = 0  # sent to a DNS server
        self.failures = 0  # of those: no answer (timeout, SERVFAIL)
        if server is not None:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [server[0]]
            self._resolver.port = server[1]
        elif lookups:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                log.warning("no DNS servers configured: NAPTR and SRV records are not looked up")
        if self._resolver is not None:
            self._resolver.lifetime = timeout
            self._resolver.cache = None  # ours, with an injected clock and a bound

    async def locate(self, uri: SipUri) -> list[Flow]:
        """The flows to try for ``uri``, best first; ServiceUnavailable when there are none."""
        secure = uri.scheme == "sips"
        host = (uri.param("maddr") or uri.host).strip("[]").rstrip(".").lower()
        transport = transport_for(uri)
        if transport is not None and (uri.port is not None or is_ip(host)):
            # §4.2: an explicit port, or a numeric host: A/AAAA only, no SRV.
            return await self._hosts([(transport, host, uri.port or DEFAULT_PORTS[transport])])
        if transport is not None:
            names = [(transport, f"{SRV_PREFIX[transport]}.{host}")]
        else:
            naptr = await self._naptr(host)
            names = naptr_services(naptr, secure=secure, transports=self.transports)
            if not names:
                # §4.1: no (usable) NAPTR: SRV for each transport we speak.
                wanted = ("tls",) if secure else SRV_PREFERENCE
                names = [(t, f"{SRV_PREFIX[t]}.{host}") for t in wanted if t in self.transports]
        found = await asyncio.gather(*(self._srv(name) for _, name in names))
        hosts = [
            (t, srv.target.rstrip(".").lower(), srv.port)
            for (t, _), records in zip(names, found, strict=True)
            for srv in order_srv(records, self._randint)
        ]
        if not hosts:
            # §4.2: no SRV records: the host itself on the transport's default port.
            transport = transport or ("tls" if secure else "udp")
            hosts = [(transport, host, DEFAULT_PORTS[transport])]
        return await self._hosts(hosts)

    async def _hosts(self, hosts: list[tuple[str, str, int]]) -> list[Flow]:
        hosts = hosts[:MAX_TARGETS]
        addresses = await asyncio.gather(*(self.addresses(name) for _, name, _ in hosts))
        flows: list[Flow] = []
        for (transport, _, port), ips in zip(hosts, addresses, strict=True):
            flows.extend(Flow(transport, ip, port) for ip in ips)
        if not flows:
            names = ", ".join(sorted({name for _, name, _ in hosts}))
            raise ServiceUnavailable(f"no address for {names}", reason="DNS Lookup Failed")
        return list(dict.fromkeys(flows))[:MAX_TARGETS]

    async def addresses(self, name: str) -> list[str]:
        """The addresses of ``name`` in the families we can reach, preferred family first."""
        if is_ip(name):
            return [name.strip("[]")]
        if self._addresses_by_dns:
            rdtypes = [("A" if f == socket.AF_INET else "AAAA") for f in self.families]
            found = await asyncio.gather(*(self._query(name, t) for t in rdtypes))
            return [str(ip) for records in found for ip in records]
        return await self._getaddrinfo(name)

    async def _naptr(self, domain: str) -> list[Naptr]:
        records = await self._query(domain, "NAPTR")
        return [r for r in records if isinstance(r, Naptr)]

    async def _srv(self, name: str) -> list[Srv]:
        records = await self._query(name, "SRV")
        return [r for r in records if isinstance(r, Srv)]

    async def _query(self, name: str, rdtype: str) -> tuple[object, ...]:
        cached = self.cache.get(name, rdtype)
        if cached is not None:
            return cached
        if self._resolver is None:
            return ()
        self.queries += 1
        ttl = NEGATIVE_TTL
        records: tuple[object, ...] = ()
        try:
            answer = await self._resolver.resolve(
                dns.name.from_text(name), rdtype, raise_on_no_answer=False, search=False
            )
            if answer.rrset is not None:
                ttl = float(answer.rrset.ttl)
                records = tuple(_convert(rd) for rd in answer.rrset)
        except dns.resolver.NXDOMAIN:
            pass
        except (dns.exception.DNSException, OSError) as exc:
            self.failures += 1
            ttl = FAILURE_TTL
            log.info("DNS %s query for %s failed: %s", rdtype, name, exc)
        self.cache.put(name, rdtype, records, ttl)
        return records

    async def _getaddrinfo(self, name: str) -> list[str]:
        cached = self.cache.get(name, "addr")
        if cached is not None:
            return [str(ip) for ip in cached]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_DGRAM), QUERY_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            log.info("cannot resolve %s: %s", name, exc)
            infos = []
        rank = {f: i for i, f in enumerate(self.families)}
        usable = sorted((i for i in infos if i[0] in rank), key=lambda i: rank[i[0]])
        ips = tuple(dict.fromkeys(str(i[4][0]) for i in usable))
        self.cache.put(name, "addr", ips, ADDRESS_TTL if ips else FAILURE_TTL)
        return list(ips)


def _convert(rd: object) -> object:
    """dnspython's rdata to our records (addresses as text)."""
    if rd.rdtype == dns.rdatatype.NAPTR:  # type: ignore[attr-defined]
        return Naptr(
            int(rd.order), int(rd.preference),  # type: ignore[attr-defined]
            rd.flags.decode(errors="replace"),  # type: ignore[attr-defined]
            rd.service.decode(errors="replace"),  # type: ignore[attr-defined]
            rd.replacement.to_text(),  # type: ignore[attr-defined]
        )  # fmt: skip
    if rd.rdtype == dns.rdatatype.SRV:  # type: ignore[attr-defined]
        return Srv(
            int(rd.priority), int(rd.weight), int(rd.port),  # type: ignore[attr-defined]
            rd.target.to_text(),  # type: ignore[attr-defined]
        )  # fmt: skip
    return str(rd.address)  # type: ignore[attr-defined]

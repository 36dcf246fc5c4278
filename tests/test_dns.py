"""RFC 3263 with a DNS server of our own on loopback: NAPTR, SRV and A/AAAA, the
ordering rules, the TTL cache, and failover from a target that answers 503 or nothing to
the next one, down to a second site that takes a call when the first is down."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import HostPort
from proxy.dns import (
    DnsCache,
    DnsLocator,
    Naptr,
    Srv,
    naptr_services,
    order_srv,
    transport_for,
)
from proxy.resolver import Resolver
from proxy.sip.errors import SipError
from proxy.sip.fork import make_cancel
from proxy.sip.message import Request, Response, make_response, parse_message
from proxy.sip.uri import SipUri, parse_uri
from proxy.transport import Flow

from .security.conftest import DOMAIN, start_site
from .security.ua import Endpoint, Sip
from .support.site import Site as SiteProcess

Zone = dict[tuple[str, str], list[str]]


class DnsServer:
    """A DNS server on 127.0.0.1 answering from ``zone`` ((name, type) -> rdata texts),
    NXDOMAIN for names it has nothing for. It runs in a thread, so that it also answers
    while a test blocks on a phone. ``queries`` lists what it was asked."""

    def __init__(self, zone: Zone, ttl: int = 60) -> None:
        self.zone = zone
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-server", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            question = query.question[0]
            name = question.name.to_text().rstrip(".").lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            reply = dns.message.make_response(query)
            records = self.zone.get((name, rdtype))
            if records:
                reply.answer.append(
                    dns.rrset.from_text(question.name, self.ttl, "IN", rdtype, *records)
                )
            elif not any(n == name for n, _ in self.zone):
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self._sock.sendto(reply.to_wire(), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
async def endpoints() -> AsyncIterator[Callable[..., Awaitable[Endpoint]]]:
    opened: list[Endpoint] = []

    async def make(host: str = "127.0.0.1", **kw: Any) -> Endpoint:
        ep = await Endpoint.open(host, **kw)
        opened.append(ep)
        return ep

    yield make
    for ep in opened:
        ep.close()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer({})
    yield server
    server.close()


def uri(text: str) -> SipUri:
    u = parse_uri(text)
    assert isinstance(u, SipUri)
    return u


def locator(server: DnsServer, **kw: object) -> DnsLocator:
    return DnsLocator(server=("127.0.0.1", server.port), **kw)  # type: ignore[arg-type]


# --- the rules, without DNS -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sip:bob@far.test", None),  # DNS decides (NAPTR, SRV)
        ("sips:bob@far.test", None),
        ("sip:bob@far.test;transport=tcp", "tcp"),
        ("sip:bob@far.test;transport=TLS", "tls"),
        ("sips:bob@far.test;transport=tcp", "tls"),  # RFC 3261 §26.2.2: sips over tcp is TLS
        ("sip:bob@192.0.2.1", "udp"),
        ("sips:bob@192.0.2.1", "tls"),
        ("sip:bob@[2001:db8::1]", "udp"),
        ("sip:bob@far.test:5070", "udp"),  # an explicit port: no SRV
        ("sips:bob@far.test:5071", "tls"),
    ],
)
def test_transport_the_uri_decides(text: str, expected: str | None) -> None:
    assert transport_for(uri(text)) == expected


def test_naptr_services_keep_what_we_speak_in_order_then_preference() -> None:
    records = [
        Naptr(20, 10, "s", "SIP+D2U", "_sip._udp.far.test."),
        Naptr(10, 20, "s", "SIP+D2T", "_sip._tcp.far.test."),
        Naptr(10, 10, "S", "SIPS+D2T", "_sips._tcp.far.test."),
        Naptr(5, 10, "s", "SIP+D2S", "_sip._sctp.far.test."),  # SCTP: not ours
        Naptr(5, 10, "u", "E2U+sip", "!^.*$!sip:x@y!"),  # ENUM-like: not an SRV name
    ]
    both = ("udp", "tcp", "tls")
    assert naptr_services(records, secure=False, transports=both) == [
        ("tls", "_sips._tcp.far.test"),
        ("tcp", "_sip._tcp.far.test"),
        ("udp", "_sip._udp.far.test"),
    ]
    # A sips URI is only ever reached over TLS; a site without TLS keeps the others.
    assert naptr_services(records, secure=True, transports=both) == [("tls", "_sips._tcp.far.test")]
    assert naptr_services(records, secure=False, transports=("udp", "tcp")) == [
        ("tcp", "_sip._tcp.far.test"),
        ("udp", "_sip._udp.far.test"),
    ]


def test_srv_order_is_priority_first_and_weighted_within() -> None:
    records = [
        Srv(20, 0, 5060, "c.far.test."),
        Srv(10, 10, 5060, "a.far.test."),
        Srv(10, 90, 5060, "b.far.test."),
        Srv(30, 0, 5060, "."),  # "no service here"
    ]
    # Drawing the top of the range picks the last running sum: b (90) before a.
    top = order_srv(records, lambda lo, hi: hi)
    assert [r.target for r in top] == ["b.far.test.", "a.far.test.", "c.far.test."]
    low = order_srv(records, lambda lo, hi: min(1, hi))
    assert [r.target for r in low] == ["a.far.test.", "b.far.test.", "c.far.test."]


srv_records = st.lists(
    st.builds(
        Srv,
        st.integers(0, 3),
        st.integers(0, 5),
        st.integers(1, 65535),
        st.sampled_from(["a.", "b.", "c.", "d.", "."]),
    ),
    max_size=8,
)


@given(srv_records, st.randoms(use_true_random=False))
def test_srv_order_is_a_permutation_sorted_by_priority(records: list[Srv], rnd: object) -> None:
    ordered = order_srv(records, rnd.randint)  # type: ignore[attr-defined]
    assert sorted(ordered, key=repr) == sorted((r for r in records if r.target != "."), key=repr)
    assert [r.priority for r in ordered] == sorted(r.priority for r in ordered)


def test_cache_keeps_records_for_their_ttl_and_stays_bounded() -> None:
    now = [0.0]
    cache = DnsCache(lambda: now[0], max_entries=2)
    cache.put("a", "A", ("192.0.2.1",), 30)
    assert cache.get("a", "A") == ("192.0.2.1",)
    now[0] = 29.9
    assert cache.get("a", "A") == ("192.0.2.1",)
    now[0] = 30.0
    assert cache.get("a", "A") is None
    for name in ("b", "c", "d"):
        cache.put(name, "A", (), 60)
    assert len(cache) == 2 and cache.get("b", "A") is None  # the oldest went first


# --- the lookups, against our DNS server -----------------------------------------------


async def test_naptr_then_srv_then_addresses(dns_server: DnsServer) -> None:
    dns_server.zone.update({
        ("far.test", "NAPTR"): ['10 10 "s" "SIP+D2T" "" _sip._tcp.far.test.',
                                '20 10 "s" "SIP+D2U" "" _sip._udp.far.test.'],
        ("_sip._tcp.far.test", "SRV"): ["10 0 5070 b.far.test.", "5 0 5080 a.far.test."],
        ("_sip._udp.far.test", "SRV"): ["10 0 5090 a.far.test."],
        ("a.far.test", "A"): ["127.0.0.11"],
        ("b.far.test", "A"): ["127.0.0.12", "127.0.0.13"],
    })  # fmt: skip
    flows = await locator(dns_server).locate(uri("sip:bob@far.test"))
    # TCP first (NAPTR order), its SRV targets by priority (a, then b's two addresses,
    # in whichever order DNS gave them), then UDP.
    assert flows[0] == Flow("tcp", "127.0.0.11", 5080)
    assert set(flows[1:3]) == {Flow("tcp", "127.0.0.12", 5070), Flow("tcp", "127.0.0.13", 5070)}
    assert flows[3:] == [Flow("udp", "127.0.0.11", 5090)]


async def test_without_naptr_srv_for_each_transport_then_plain_host(
    dns_server: DnsServer,
) -> None:
    dns_server.zone.update({
        ("_sip._tcp.far.test", "SRV"): ["10 0 5070 a.far.test."],
        ("a.far.test", "A"): ["127.0.0.11"],
        ("plain.test", "A"): ["127.0.0.14"],
    })  # fmt: skip
    loc = locator(dns_server)
    assert await loc.locate(uri("sip:bob@far.test")) == [Flow("tcp", "127.0.0.11", 5070)]
    assert ("_sip._udp.far.test", "SRV") in dns_server.queries
    # No NAPTR, no SRV: the host itself, UDP, port 5060 (RFC 3263 §4.2).
    assert await loc.locate(uri("sip:bob@plain.test")) == [Flow("udp", "127.0.0.14", 5060)]


async def test_sips_is_tls_on_5061_and_looks_up_sips_srv_only(dns_server: DnsServer) -> None:
    dns_server.zone.update({
        ("_sips._tcp.far.test", "SRV"): ["10 0 5063 a.far.test."],
        ("_sip._udp.far.test", "SRV"): ["10 0 5060 a.far.test."],
        ("a.far.test", "A"): ["127.0.0.11"],
        ("plain.test", "A"): ["127.0.0.14"],
    })  # fmt: skip
    loc = locator(dns_server, transports=("udp", "tcp", "tls"))
    assert await loc.locate(uri("sips:bob@far.test")) == [Flow("tls", "127.0.0.11", 5063)]
    assert ("_sip._udp.far.test", "SRV") not in dns_server.queries
    assert await loc.locate(uri("sips:bob@plain.test")) == [Flow("tls", "127.0.0.14", 5061)]
    assert await loc.locate(uri("sip:bob@plain.test;transport=tls")) == [
        Flow("tls", "127.0.0.14", 5061)
    ]


async def test_an_explicit_port_or_address_asks_no_srv(dns_server: DnsServer) -> None:
    dns_server.zone.update({("a.far.test", "A"): ["127.0.0.11"]})
    loc = locator(dns_server)
    assert await loc.locate(uri("sip:bob@a.far.test:5077")) == [Flow("udp", "127.0.0.11", 5077)]
    assert await loc.locate(uri("sip:bob@127.0.0.9;transport=tcp")) == [
        Flow("tcp", "127.0.0.9", 5060)
    ]
    assert {q for q in dns_server.queries} == {("a.far.test", "A"), ("a.far.test", "AAAA")}


async def test_answers_are_cached_for_their_ttl(dns_server: DnsServer) -> None:
    dns_server.ttl = 30
    dns_server.zone.update({
        ("_sip._udp.far.test", "SRV"): ["10 0 5070 a.far.test."],
        ("a.far.test", "A"): ["127.0.0.11"],
    })  # fmt: skip
    now = [1000.0]
    loc = locator(dns_server, clock=lambda: now[0])
    first = await loc.locate(uri("sip:bob@far.test"))
    asked = len(dns_server.queries)
    assert await loc.locate(uri("sip:carol@far.test")) == first
    assert len(dns_server.queries) == asked  # all from the cache, NXDOMAINs too
    now[0] += 31
    await loc.locate(uri("sip:bob@far.test"))
    assert len(dns_server.queries) == 2 * asked


async def test_addresses_of_a_family_we_cannot_reach_are_left_out(
    dns_server: DnsServer,
) -> None:
    dns_server.zone.update({
        ("a.far.test", "A"): ["127.0.0.11"],
        ("a.far.test", "AAAA"): ["::1"],
    })  # fmt: skip
    v4 = locator(dns_server, families=(socket.AF_INET,))
    assert await v4.locate(uri("sip:a.far.test:5060")) == [Flow("udp", "127.0.0.11", 5060)]
    both = locator(dns_server, families=(socket.AF_INET6, socket.AF_INET))
    assert await both.locate(uri("sip:a.far.test:5060")) == [
        Flow("udp", "::1", 5060),
        Flow("udp", "127.0.0.11", 5060),
    ]


async def test_a_name_without_address_is_503_dns_lookup_failed(dns_server: DnsServer) -> None:
    with pytest.raises(SipError) as info:
        await locator(dns_server).locate(uri("sip:bob@nowhere.test"))
    assert info.value.status_code == 503
    assert "DNS" in (info.value.reason or "")


async def test_a_dead_dns_server_is_503_and_not_asked_again_at_once() -> None:
    quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    quiet.bind(("127.0.0.1", 0))
    try:
        loc = DnsLocator(server=("127.0.0.1", quiet.getsockname()[1]), timeout=0.3)
        with pytest.raises(SipError):
            await loc.locate(uri("sip:bob@far.test"))
        assert loc.failures >= 1
        asked = loc.queries
        with pytest.raises(SipError):
            await loc.locate(uri("sip:bob@far.test"))
        assert loc.queries == asked
    finally:
        quiet.close()


async def test_resolver_routes_before_dns_and_outbound_proxy_for_request_uris(
    dns_server: DnsServer,
) -> None:
    dns_server.zone.update({("far.test", "A"): ["127.0.0.11"]})
    resolver = Resolver(
        lambda host, port: False,
        locator=locator(dns_server),
        routes=[("kam.test", uri("sip:127.0.0.3:5070;transport=tcp"))],
        outbound_proxy=uri("sip:127.0.0.4:5080"),
    )
    assert await resolver.resolve_request(uri("sip:carol@KAM.test.")) == [
        Flow("tcp", "127.0.0.3", 5070)
    ]
    assert await resolver.resolve_request(uri("sip:bob@far.test")) == [
        Flow("udp", "127.0.0.4", 5080)
    ]
    # A Route hop is not a Request-URI: DNS, not the outbound proxy.
    assert await resolver.resolve_all(uri("sip:far.test;lr")) == [Flow("udp", "127.0.0.11", 5060)]
    assert await resolver.resolve(uri("sip:kam.test;lr")) == Flow("tcp", "127.0.0.3", 5070)


@pytest.mark.parametrize(
    "text", ["sips:bob@192.0.2.1", "sip:bob@192.0.2.1;transport=sctp", "sips:b@h;transport=udp"]
)
async def test_transports_we_cannot_send_on_are_503(text: str) -> None:
    resolver = Resolver(lambda host, port: False)  # UDP and TCP only
    with pytest.raises(SipError) as info:
        await resolver.resolve(uri(text))
    assert info.value.status_code == 503


async def test_tls_targets_once_tls_is_there() -> None:
    resolver = Resolver(lambda h, p: False, locator=DnsLocator(transports=("udp", "tcp", "tls")))
    assert await resolver.resolve(uri("sips:bob@192.0.2.1")) == Flow("tls", "192.0.2.1", 5061)
    assert await resolver.resolve(uri("sip:bob@192.0.2.1:5071;transport=tls")) == Flow(
        "tls", "192.0.2.1", 5071
    )


# --- failover through a site (RFC 3263 §4.3) ---------------------------------------------


async def _far_site(tmp_path: Path, dns_server: DnsServer, *targets: Endpoint) -> object:
    dns_server.zone[("_sip._udp.far.test", "SRV")] = [
        f"{10 * (i + 1)} 0 {ep.port} t{i}.far.test." for i, ep in enumerate(targets)
    ]
    for i, ep in enumerate(targets):
        dns_server.zone[(f"t{i}.far.test", "A")] = [ep.host]
    return await start_site(
        tmp_path, dns_server=HostPort("127.0.0.1", dns_server.port), failover_timeout=0.5
    )


def _requests(ep: Endpoint, method: str) -> list[Request]:
    return [r for r in ep.requests() if r.method == method]


async def _call(alice: Sip, method: str = "INVITE") -> Response:
    return await alice.request(
        method, "sip:bob@far.test", from_=f"sip:alice@{DOMAIN}", password="wonderland"
    )


async def test_a_target_that_answers_503_is_left_for_the_next(
    tmp_path: Path, dns_server: DnsServer, endpoints
) -> None:
    first = await endpoints("127.0.0.21", invite_status=503)
    second = await endpoints("127.0.0.22", invite_status=486)
    site = await _far_site(tmp_path, dns_server, first, second)
    try:
        alice = Sip(await endpoints(), ("127.0.0.1", site.sip_port))  # type: ignore[attr-defined]
        resp = await _call(alice)
        assert resp.status == 486  # the second target's answer
        [a] = _requests(first, "INVITE")
        [b] = _requests(second, "INVITE")
        assert a.top_via.branch != b.top_via.branch  # a new transaction (§4.3)
        assert site.router.routing_stats()["failovers"] == 1  # type: ignore[attr-defined]
    finally:
        await site.close()  # type: ignore[attr-defined]


async def test_a_silent_target_is_left_for_the_next_within_the_budget(
    tmp_path: Path, dns_server: DnsServer, endpoints
) -> None:
    dead = await endpoints("127.0.0.21", answer=False)
    live = await endpoints("127.0.0.22", invite_status=486)
    site = await _far_site(tmp_path, dns_server, dead, live)
    try:
        alice = Sip(await endpoints(), ("127.0.0.1", site.sip_port))  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert (await _call(alice)).status == 486
        assert 0.4 < loop.time() - start < 3.0  # failover_timeout is 0.5 s
        assert _requests(dead, "INVITE") and len(_requests(live, "INVITE")) == 1
        # Non-INVITE requests fail over the same way.
        assert (await _call(alice, "MESSAGE")).status == 200
        assert len(_requests(live, "MESSAGE")) == 1
    finally:
        await site.close()  # type: ignore[attr-defined]


async def test_when_every_target_fails_the_caller_hears_the_last(
    tmp_path: Path, dns_server: DnsServer, endpoints
) -> None:
    first = await endpoints("127.0.0.21", invite_status=503)
    second = await endpoints("127.0.0.22", invite_status=503)
    site = await _far_site(tmp_path, dns_server, first, second)
    try:
        alice = Sip(await endpoints(), ("127.0.0.1", site.sip_port))  # type: ignore[attr-defined]
        assert (await _call(alice)).status in (500, 503)
        assert len(_requests(first, "INVITE")) == len(_requests(second, "INVITE")) == 1
    finally:
        await site.close()  # type: ignore[attr-defined]


# --- a second site takes the calls of the first (real processes, real phones) ----------


P2P = "p2p.test"


@pytest.mark.e2e
def test_an_srv_listed_second_site_takes_a_call_when_the_first_is_down(
    tmp_path: Path, phone_factory
) -> None:
    users = tmp_path / "users.toml"
    users.write_text('[users."alice"]\npassword = "wonderland"\n')
    first = SiteProcess(tmp_path / "first", "127.0.0.31", ["--domain", P2P])
    second = SiteProcess(tmp_path / "second", "127.0.0.32", ["--domain", P2P])
    server = DnsServer({
        # What the README shows: phones and other domains find both sites, the first
        # preferred (priority 10), the second when the first does not answer.
        (f"_sip._udp.{P2P}", "SRV"): [f"10 0 {first.port} site1.{P2P}.",
                                      f"20 0 {second.port} site2.{P2P}."],
        (f"site1.{P2P}", "A"): [first.host],
        (f"site2.{P2P}", "A"): [second.host],
    })  # fmt: skip
    config = tmp_path / "caller.toml"
    config.write_text(f'dns_server = "{server.address}"\nfailover_timeout = 1.0\n')
    caller = SiteProcess(
        tmp_path / "caller",
        "127.0.0.33",
        ["--domain", "caller.test", "--users", str(users), "--config", str(config)],
    )
    sites = [first, second, caller]
    try:
        for site in sites:
            site.workdir.mkdir(parents=True, exist_ok=True)
            site.start()
        bob = phone_factory("bob")
        assert bob.register(second.sip, "bob", P2P) == 200
        alice = phone_factory("alice")
        assert alice.register(caller.sip, "alice", "caller.test", password="wonderland") == 200
        first.kill()  # the preferred site is down
        alice.call(f"sip:bob@{P2P}")
        bob.wait_incoming(timeout=10)
        bob.answer(200)
        alice.wait_state("CONFIRMED", timeout=10)
        bob.wait_state("CONFIRMED", timeout=10)
        bob.hangup()  # BYE from the callee, back through both proxies
        alice.wait_state("DISCONNECTED", timeout=10)
        assert "trying udp:127.0.0.32" in caller.log()
    finally:
        for site in sites:
            site.stop()
        server.close()


class Ringing(Endpoint):
    """A phone that rings (180) and answers a CANCEL: 200 to it, 487 to the INVITE."""

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        msg = parse_message(data)
        self.received.append(data)
        assert self.transport is not None
        if isinstance(msg, Request) and msg.method == "INVITE":
            self.invite = msg
            self.transport.sendto(make_response(msg, 180, to_tag="r").to_bytes(), addr)
        elif isinstance(msg, Request) and msg.method == "CANCEL":
            self.transport.sendto(make_response(msg, 200, to_tag="r").to_bytes(), addr)
            self.transport.sendto(make_response(self.invite, 487, to_tag="r").to_bytes(), addr)
        self.inbox.put_nowait(msg)


async def test_a_cancel_goes_to_the_target_that_took_over(
    tmp_path: Path, dns_server: DnsServer, endpoints
) -> None:
    dead = await endpoints("127.0.0.21", answer=False)
    ringing = await Ringing.open("127.0.0.22")
    site = await _far_site(tmp_path, dns_server, dead, ringing)
    try:
        ep = await endpoints()
        alice = Sip(ep, ("127.0.0.1", site.sip_port))  # type: ignore[attr-defined]
        call = asyncio.create_task(_call(alice))
        # The dead target stays silent; after failover_timeout the second one rings.
        while not any(r.method == "INVITE" for r in ringing.requests()):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # its 180 on the way back
        invite = parse_message(alice.last_request)
        assert isinstance(invite, Request)
        ep.sendto(make_cancel(invite).to_bytes(), "127.0.0.1", site.sip_port)  # type: ignore[attr-defined]
        # (ua.Sip matches finals by Call-ID and CSeq number: the CANCEL's 200 comes first.)
        answered = await asyncio.wait_for(call, 5)
        assert (answered.cseq.method, answered.status) == ("CANCEL", 200)
        final = await alice.final(invite.call_id, invite.cseq.number)
        assert (final.cseq.method, final.status) == ("INVITE", 487)
        [cancel] = _requests(ringing, "CANCEL")
        assert cancel.top_via.branch == _requests(ringing, "INVITE")[0].top_via.branch
        assert not _requests(dead, "CANCEL")  # it never rang: no CANCEL (§9.1)
    finally:
        ringing.close()
        await site.close()  # type: ignore[attr-defined]

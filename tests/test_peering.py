"""Peering with SIP servers that are not p2psip sites: static routes and an outbound
proxy tried before DNS, trusted peers (no challenge, may relay, never flood-blocked, and a
stranger at another address still challenged), the site's own address as an alias of its
domain, and connections that leave from the listen address. The Kamailio neighbour at the
end runs the real thing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config import StaticRoute, parse_next_hop
from proxy.flood import FloodGuard
from proxy.sip.message import Request
from proxy.site import Site
from proxy.transport import Flow, TransportLayer

from .security.conftest import DOMAIN, start_site
from .security.ua import Endpoint, Sip
from .support.kamailio import AVAILABLE as KAMAILIO
from .support.kamailio import Kamailio
from .support.site import Site as SiteProcess
from .support.site import free_port

PEER = "127.0.0.41"  # a trusted SIP server (a Kamailio edge, an ITSP)
STRANGER = "127.0.0.42"
OUTSIDE = "127.0.0.43"  # where peers' domains live

Endpoints = Callable[..., Awaitable[Endpoint]]


@pytest.fixture
async def endpoints() -> AsyncIterator[Endpoints]:
    opened: list[Endpoint] = []

    async def make(host: str = "127.0.0.1", **kw: Any) -> Endpoint:
        ep = await Endpoint.open(host, **kw)
        opened.append(ep)
        return ep

    yield make
    for ep in opened:
        ep.close()


def invites(ep: Endpoint) -> list[Request]:
    return [r for r in ep.requests() if r.method == "INVITE"]


async def test_a_static_route_takes_requests_for_its_domain_before_dns(
    tmp_path: Path, endpoints: Endpoints
) -> None:
    kam = await endpoints(OUTSIDE)
    itsp = await endpoints(OUTSIDE)
    site = await start_site(
        tmp_path,
        routes=(StaticRoute("kam.test", parse_next_hop(f"{kam.host}:{kam.port}", "route")),),
        outbound_proxy=parse_next_hop(f"{itsp.host}:{itsp.port}", "outbound"),
    )
    try:
        alice = Sip(await endpoints(), ("127.0.0.1", site.sip_port))
        resp = await alice.request(
            "INVITE", "sip:carol@kam.test", from_=f"sip:alice@{DOMAIN}", password="wonderland"
        )
        assert resp.status == 486  # what the peer answered
        [got] = invites(kam)
        assert got.uri == "sip:carol@kam.test"  # the Request-URI is the peer's to route
        # Any other foreign domain goes to the outbound proxy, never to DNS.
        resp = await alice.request(
            "INVITE", "sip:+15551234@pstn.test", from_=f"sip:alice@{DOMAIN}",
            password="wonderland",
        )  # fmt: skip
        assert resp.status == 486
        assert [r.uri for r in invites(itsp)] == ["sip:+15551234@pstn.test"]
        assert len(invites(kam)) == 1
    finally:
        await site.close()


async def _peer_site(tmp_path: Path, target: Endpoint, **settings: Any) -> Site:
    route = StaticRoute("kam.test", parse_next_hop(f"{target.host}:{target.port}", "route"))
    return await start_site(tmp_path, routes=(route,), trusted_peers=(PEER,), **settings)


async def test_a_trusted_peer_relays_without_a_challenge_and_a_stranger_is_challenged(
    tmp_path: Path, endpoints: Endpoints
) -> None:
    kam = await endpoints(OUTSIDE)
    site = await _peer_site(tmp_path, kam)
    proxy = ("127.0.0.1", site.sip_port)
    try:
        peer = Sip(await endpoints(PEER), proxy)
        pai = "P-Asserted-Identity: <sip:carol@kam.test>"
        resp = await peer.request(
            "INVITE", "sip:dave@kam.test", from_="sip:carol@kam.test", extra=(pai,)
        )
        assert resp.status == 486  # relayed, not 407
        [got] = invites(kam)
        assert got.from_.uri is not None and str(got.from_.uri) == "sip:carol@kam.test"
        assert got.headers.get("P-Asserted-Identity") == "<sip:carol@kam.test>"
        assert site.stats()["trusted_peer_requests"] == 1
        # The same request from anyone else is challenged, and nothing goes out.
        stranger = Sip(await endpoints(STRANGER), proxy)
        resp = await stranger.request(
            "INVITE", "sip:dave@kam.test", from_="sip:carol@kam.test", extra=(pai,)
        )
        assert resp.status == 407
        await asyncio.sleep(0.2)
        assert len(invites(kam)) == 1
    finally:
        await site.close()


async def test_a_trusted_peer_calls_a_user_claiming_a_local_from_without_a_challenge(
    tmp_path: Path, endpoints: Endpoints
) -> None:
    """An edge serving the same domain's phones sends From in our domain: not challenged
    from the peer, challenged from a stranger."""
    bob_phone = await endpoints()
    site = await _peer_site(tmp_path, await endpoints(OUTSIDE))
    proxy = ("127.0.0.1", site.sip_port)
    try:
        bob = Sip(bob_phone, proxy)
        assert (await bob.request(
            "REGISTER", f"sip:{DOMAIN}", from_=f"sip:bob@{DOMAIN}", to=f"sip:bob@{DOMAIN}",
            password="builder",
        )).status == 200  # fmt: skip
        peer = Sip(await endpoints(PEER), proxy)
        resp = await peer.request("INVITE", f"sip:bob@{DOMAIN}", from_=f"sip:erin@{DOMAIN}")
        assert resp.status == 486  # bob's phone answered
        stranger = Sip(await endpoints(STRANGER), proxy)
        resp = await stranger.request("INVITE", f"sip:bob@{DOMAIN}", from_=f"sip:erin@{DOMAIN}")
        assert resp.status == 407
    finally:
        await site.close()


async def test_the_sites_own_address_is_an_alias_of_its_domain(
    tmp_path: Path, endpoints: Endpoints
) -> None:
    bob_phone = await endpoints()
    site = await start_site(tmp_path)
    proxy = ("127.0.0.1", site.sip_port)
    try:
        bob = Sip(bob_phone, proxy)
        assert (await bob.request(
            "REGISTER", f"sip:{DOMAIN}", from_=f"sip:bob@{DOMAIN}", to=f"sip:bob@{DOMAIN}",
            password="builder",
        )).status == 200  # fmt: skip
        caller = Sip(await endpoints(STRANGER), proxy)
        # sip:bob@127.0.0.1:PORT is bob@example.com (it was 404: a foreign domain).
        resp = await caller.request(
            "INVITE", f"sip:bob@127.0.0.1:{site.sip_port}", from_="sip:x@elsewhere.test"
        )
        assert resp.status == 486
        assert len(invites(bob_phone)) == 1
    finally:
        await site.close()


def test_trusted_peers_are_never_flood_blocked() -> None:
    peers = {"127.0.0.41"}
    guard = FloodGuard(5, 1.0, 30.0, trusted=peers.__contains__)
    assert all(guard.admit("127.0.0.41", 0.0) for _ in range(100))
    assert not all(guard.admit("127.0.0.42", 0.0) for _ in range(100))


async def test_connections_we_open_leave_from_the_listen_address() -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.put_nowait(writer.get_extra_info("peername")[0])
        writer.close()

    server = await asyncio.start_server(accept, OUTSIDE, 0)
    port = server.sockets[0].getsockname()[1]
    layer = TransportLayer()
    await layer.start("127.0.0.44", 0)
    try:
        layer.send(Flow("tcp", OUTSIDE, port), b"OPTIONS sip:x SIP/2.0\r\n\r\n")
        # The peer's received= shows the site's address, not the route's 127.0.0.1.
        assert await asyncio.wait_for(seen.get(), 5) == "127.0.0.44"
    finally:
        await layer.close()
        server.close()
        await server.wait_closed()


async def test_a_dual_stack_listener_takes_ipv4_and_ipv6_as_they_are() -> None:
    got: asyncio.Queue[Flow] = asyncio.Queue()
    layer = TransportLayer(lambda data, flow: got.put_nowait(flow))
    port = await layer.start("::", 0)
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v4.bind(("127.0.0.1", 0))
    v4.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        v4.sendto(b"OPTIONS sip:x SIP/2.0\r\n\r\n", ("127.0.0.1", port))
        flow = await asyncio.wait_for(got.get(), 5)
        assert flow == Flow("udp", "127.0.0.1", v4.getsockname()[1])  # not ::ffff:127.0.0.1
        layer.send(flow, b"SIP/2.0 200 OK\r\n\r\n")
        assert await asyncio.wait_for(loop.sock_recv(v4, 100), 5) == b"SIP/2.0 200 OK\r\n\r\n"
        for host in ("127.0.0.1", "::1"):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n")
            flow = await asyncio.wait_for(got.get(), 5)
            assert (flow.transport, flow.host) == ("tcp", host)
            writer.close()
    finally:
        v4.close()
        await layer.close()


# --- a Kamailio neighbour (real processes, real phones) ----------------------------------

P2P = "p2p.test"
KAM = "kam.test"
SITE_HOST = "127.0.0.51"
KAM_HOST = "127.0.0.52"
PEER_USERS = '[users."alice"]\npassword = "wonderland"\n'


def _neighbours(tmp_path: Path, *routes: str) -> tuple[SiteProcess, Kamailio]:
    """A p2psip site serving p2p.test (alice has a password) whose route for kam.test
    goes to Kamailio over TCP, Kamailio trusted; Kamailio serves kam.test and sends
    every other domain to the site."""
    if not KAMAILIO:
        pytest.skip("kamailio is not installed (scripts/test installs it)")
    users = tmp_path / "users.toml"
    users.write_text(PEER_USERS)
    kam_port = free_port(KAM_HOST)
    site = SiteProcess(tmp_path / "site", SITE_HOST, [
        "--domain", P2P, "--users", str(users), "--trusted-peer", KAM_HOST,
        "--route", f"{KAM}={KAM_HOST}:{kam_port};transport=tcp",
        *(arg for route in routes for arg in ("--route", route)),
    ])  # fmt: skip
    site.workdir.mkdir(parents=True)
    kamailio = Kamailio(tmp_path / "kamailio", KAM_HOST, kam_port, KAM, site.sip)
    return site, kamailio


def _answered(caller, callee, target: str):
    caller.call(target)
    incoming = callee.wait_incoming(timeout=10)
    callee.answer(200)
    caller.wait_state("CONFIRMED", timeout=10)
    callee.wait_state("CONFIRMED", timeout=10)
    return incoming


def _cancelled(caller, callee, target: str) -> None:
    caller.call(target)
    callee.wait_incoming(timeout=10)
    caller.wait_state("EARLY", timeout=10)  # it rings (180): now CANCEL may go
    caller.hangup()
    assert caller.wait_state("DISCONNECTED", timeout=10)["code"] == 487
    callee.wait_state("DISCONNECTED", timeout=10)


@pytest.mark.e2e
def test_phones_on_each_side_of_a_kamailio_neighbour_call_each_other(
    tmp_path: Path, phone_factory
) -> None:
    site, kamailio = _neighbours(tmp_path)
    try:
        site.start()
        kamailio.start()
        alice = phone_factory("alice")
        carol = phone_factory("carol")
        assert alice.register(site.sip, "alice", P2P, password="wonderland") == 200
        assert carol.register(kamailio.sip, "carol", KAM) == 200

        # p2psip -> Kamailio by the static route (TCP, from the site's own address);
        # the callee hangs up: BYE from Kamailio's side.
        incoming = _answered(alice, carol, f"sip:carol@{KAM}")
        vias = [v for v in str(incoming["msg"]).splitlines() if v.startswith("Via:")]
        ours = [v for v in vias if f" {SITE_HOST}:{site.port};" in v]
        assert ours and ours[0].startswith("Via: SIP/2.0/TCP"), vias
        # Kamailio saw the connection come from the address our Via names (RFC 3581
        # writes received= with rport), not from the route's 127.0.0.1.
        assert "received=127.0.0.1;" not in ours[0] and f"received={SITE_HOST};" in ours[0]
        carol.hangup()
        alice.wait_state("DISCONNECTED", timeout=10)

        # Kamailio -> p2psip by Kamailio's own routing; BYE from the p2psip side.
        _answered(carol, alice, f"sip:alice@{P2P}")
        alice.hangup()
        carol.wait_state("DISCONNECTED", timeout=10)

        # CANCEL from either side.
        _cancelled(alice, carol, f"sip:carol@{KAM}")
        _cancelled(carol, alice, f"sip:alice@{P2P}")
    finally:
        kamailio.stop()
        site.stop()


@pytest.mark.e2e
def test_kamailio_as_a_trusted_peer_relays_unchallenged_and_a_stranger_is_challenged(
    tmp_path: Path, phone_factory
) -> None:
    dave = phone_factory("dave")  # far.test's only phone, reached by a static route
    site, kamailio = _neighbours(tmp_path, f"far.test={dave.bind_ip}:{dave.port}")
    try:
        site.start()
        kamailio.start()
        carol = phone_factory("carol")
        assert carol.register(kamailio.sip, "carol", KAM) == 200
        # carol has no credentials at the site: only trust lets Kamailio relay through it.
        _answered(carol, dave, "sip:dave@far.test")
        dave.hangup()
        carol.wait_state("DISCONNECTED", timeout=10)
        # The same request from another address is challenged.
        assert _raw_invite(STRANGER, site, "sip:dave@far.test").startswith(b"SIP/2.0 407 ")
    finally:
        kamailio.stop()
        site.stop()


def _raw_invite(source: str, site: SiteProcess, ruri: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        port = s.getsockname()[1]
        s.settimeout(5)
        s.sendto(
            (
                f"INVITE {ruri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {source}:{port};branch=z9hG4bKstranger1;rport\r\n"
                f"From: <sip:carol@{KAM}>;tag=s1\r\nTo: <{ruri}>\r\n"
                "Call-ID: stranger-1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
                f"Contact: <sip:carol@{source}:{port}>\r\nContent-Length: 0\r\n\r\n"
            ).encode(),
            (site.host, site.port),
        )
        while True:
            reply = s.recv(65535)
            if not reply.startswith(b"SIP/2.0 100"):
                return reply

"""RFC 5626 outbound and the NAT keep-alives, in memory: a REGISTER through the real
RegistrarService, calls through the real Router and the real directory, fake
transactions and resolver, and two manual clocks (wall time for bindings, monotonic
time for flows)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

import pytest

from dht_adaptor.location import MemoryStore
from proxy.auth_gate import AuthGate
from proxy.directory import FLOW_GRACE, LocalDirectory
from proxy.forker import Forker
from proxy.nat_keepalive import MISSES, NatKeepalive
from proxy.registrar_service import RegistrarService
from proxy.resolver import Resolver
from proxy.router import Router
from proxy.sip.errors import NotFound, SipError
from proxy.sip.message import Response
from proxy.sip.registrar import FlowFailed, RegistrarConfig
from proxy.stats import SipCounters
from proxy.transactions import ServerTx
from proxy.transport import Flow

from .fakes import (
    ME,
    TOKENS,
    FakePublisher,
    FakeResolver,
    FakeTransactions,
    FakeUsers,
    ManualClock,
    Spawner,
    server_tx,
)
from .messages import request

BOB = "sip:bob@example.com"
INSTANCE = '"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'
OB = "Supported: outbound, path"
BOB_TCP = Flow("tcp", "192.0.2.20", 49170)  # bob's connection, from an ephemeral port
BOB_UDP = Flow("udp", "198.51.100.20", 40000)  # bob's NAT's address for his UDP flow
BOB_CONTACT = "sip:bob@10.0.0.20:5060;ob"  # behind NAT: not reachable but over the flow
UDP_TIMER = 60


class Resolving(FakeResolver):
    """The fake resolver with the real rule for outbound flows."""

    def outbound_flow(self, source: str) -> Flow:
        real = Resolver(lambda host, port: (host, port) in self.connections)
        return real.outbound_flow(source)


class Monotonic(ManualClock):
    pass


@dataclass
class Site:
    registrar: RegistrarService
    router: Router
    directory: LocalDirectory
    store: MemoryStore
    transactions: FakeTransactions
    resolver: Resolving
    counters: SipCounters
    clock: ManualClock
    monotonic: Monotonic

    async def register(
        self, contact: str, flow: Flow, *, cseq: int = 1, outbound: bool = True, **kw: object
    ) -> Response:
        transport = flow.transport.upper()
        via = f"SIP/2.0/{transport} {flow.host}:{flow.port};branch=z9hG4bKreg{cseq};rport"
        req = request(
            "REGISTER", "sip:example.com", from_=BOB, to=BOB, call_id="reg@bob", cseq=cseq,
            vias=[via], contact=contact, extra=[OB] if outbound else [], **kw,
        )  # fmt: skip
        stx = server_tx(req, flow)
        if flow.reliable:
            self.resolver.connections.add((flow.host, flow.port))
        await self.registrar.handle(stx)
        [resp] = self.transactions.sent_to(stx)
        return resp

    async def call(self, ruri: str = BOB) -> ServerTx:
        stx = server_tx(request("INVITE", ruri, call_id=f"call-{len(self.transactions.started)}"))
        await self.router.route(stx)
        return stx

    async def status_of_call(self) -> int:
        try:
            await self.call()
        except SipError as exc:
            return exc.status_code
        return 0  # forked: no answer from the proxy itself

    def closed(self, flow: Flow) -> None:
        """The transport lost the connection (and says so)."""
        self.resolver.connections.discard((flow.host, flow.port))
        self.directory.flow_closed(flow)


def site(*users: tuple[str, str]) -> Site:
    clock = ManualClock()
    monotonic = Monotonic(0.0)
    store = MemoryStore()
    transactions = FakeTransactions()
    fake_users = FakeUsers()
    for name, password in users:
        fake_users.add(name, password)
    counters = SipCounters()
    directory = LocalDirectory(
        store, fake_users, clock, udp_flow_timeout=UDP_TIMER + FLOW_GRACE, monotonic=monotonic
    )
    auth = AuthGate(
        fake_users, "example.com", b"s" * 32,
        transactions=transactions, counters=counters, clock=clock,
    )  # fmt: skip
    registrar = RegistrarService(
        RegistrarConfig(domains=("example.com",), flow_timer_udp=UDP_TIMER),
        identity=ME, directory=directory, transactions=transactions, auth=auth,
        publisher=FakePublisher(), counters=counters, clock=clock,
    )  # fmt: skip
    resolver = Resolving()
    router = Router(
        identity=ME, transactions=transactions, directory=directory, auth=auth,
        resolver=cast(Resolver, resolver),
        forker=Forker(transactions, ME, TOKENS, timer_c=180.0), counters=counters,
        send=lambda flow, data: None, spawn=Spawner(), tokens=TOKENS, clock=clock,
    )  # fmt: skip
    return Site(
        registrar, router, directory, store, transactions, resolver, counters, clock, monotonic
    )


def ob_contact(contact: str = BOB_CONTACT, reg_id: int = 1) -> str:
    return f"<{contact}>;+sip.instance={INSTANCE};reg-id={reg_id}"


def invites(s: Site) -> list[Flow]:
    return [b.flow for b in s.transactions.branches()]


# --- the flow of a binding registered with outbound ---------------------------------------


async def test_a_phone_registered_with_outbound_is_reached_over_its_flow_only() -> None:
    s = site()
    resp = await s.register(ob_contact(), BOB_TCP)
    assert resp.headers.values("Require") == ["outbound"]
    assert resp.headers.get("Flow-Timer") == str(RegistrarConfig().flow_timer_stream)
    await s.call()
    assert invites(s) == [BOB_TCP]  # the connection, not the contact's address


async def test_a_closed_connection_makes_calls_get_430_until_the_phone_registers_again() -> None:
    s = site()
    await s.register(ob_contact(), BOB_TCP)
    s.closed(BOB_TCP)
    assert await s.status_of_call() == 430
    assert invites(s) == []  # nothing was sent anywhere else
    assert s.counters.flow_failed == 1
    # The phone notices, connects again and registers over the new flow.
    again = Flow("tcp", BOB_TCP.host, 49171)
    await s.register(ob_contact(), again, cseq=2)
    await s.call()
    assert invites(s) == [again]


async def test_a_connection_gone_without_a_word_is_a_failed_flow_too() -> None:
    # The REGISTER raced the connection's end: the transport said nothing the directory
    # heard, but the connection is not there to send on.
    s = site()
    await s.register(ob_contact(), BOB_TCP)
    s.resolver.connections.clear()
    with pytest.raises(FlowFailed):
        await s.call()


async def test_a_udp_flow_fails_when_its_keepalives_stop() -> None:
    s = site()
    resp = await s.register(ob_contact(), BOB_UDP)
    assert resp.headers.get("Flow-Timer") == str(UDP_TIMER)
    for _ in range(5):  # STUN keep-alives every 50 s keep the flow working
        s.monotonic.advance(50)
        s.directory.flow_heard(BOB_UDP)
    await s.call()
    assert invites(s) == [BOB_UDP]
    s.monotonic.advance(UDP_TIMER + FLOW_GRACE - 1)
    await s.call()  # still within the Flow-Timer and its grace
    s.monotonic.advance(2)
    assert await s.status_of_call() == 430
    # Another flow's keep-alives change nothing for this one.
    s.directory.flow_heard(Flow("udp", BOB_UDP.host, BOB_UDP.port + 1))
    assert await s.status_of_call() == 430
    s.directory.flow_heard(BOB_UDP)  # the phone is back (e.g. a NAT blip)
    await s.call()
    assert invites(s) == [BOB_UDP] * 3


async def test_a_phone_with_two_flows_gets_the_request_once_over_one_that_works() -> None:
    # RFC 5626 §5.3: one instance, two reg-ids (two flows, e.g. to two edge addresses).
    s = site()
    second = Flow("tcp", "192.0.2.20", 49180)
    await s.register(ob_contact(reg_id=1), BOB_TCP)
    s.clock.advance(10)  # the second registration is the later one
    await s.register(ob_contact("sip:bob@10.0.0.20:5062;ob", reg_id=2), second, cseq=2)
    await s.call()
    assert invites(s) == [second]
    s.closed(second)
    await s.call()
    assert invites(s) == [second, BOB_TCP]
    s.closed(BOB_TCP)
    assert await s.status_of_call() == 430


async def test_a_failed_flow_leaves_the_other_phones_of_the_user_ringing() -> None:
    s = site()
    desk = Flow("udp", "192.0.2.21", 5060)
    await s.register(ob_contact(), BOB_TCP)
    await s.register("<sip:bob@192.0.2.21:5060>", desk, cseq=2, outbound=False)
    s.closed(BOB_TCP)
    await s.call()
    assert invites(s) == [desk]  # no 430: someone can still answer


async def test_strangers_learn_nothing_from_a_failed_flow() -> None:
    # On a site with users, only local users learn that a user exists but is not
    # reachable now; the 430 is such an answer.
    s = site(("bob", "builder"))
    s.registrar = RegistrarService(
        RegistrarConfig(domains=("example.com",)), identity=ME, directory=s.directory,
        transactions=s.transactions, auth=AuthGate(
            FakeUsers(), "example.com", b"s" * 32, transactions=s.transactions,
            counters=s.counters, clock=s.clock,
        ), publisher=FakePublisher(), counters=s.counters, clock=s.clock,
    )  # fmt: skip
    await s.register(ob_contact(), BOB_TCP)
    s.closed(BOB_TCP)
    stx = server_tx(request("INVITE", BOB, from_="sip:mallory@evil.example"))
    with pytest.raises(NotFound):
        await s.router.route(stx)


async def test_a_register_without_outbound_is_reached_as_before() -> None:
    # No Supported: outbound: the TCP connection is used while it lasts, then the
    # contact itself (the phone listens there).
    s = site()
    await s.register(ob_contact("sip:bob@192.0.2.20:5070;transport=tcp"), BOB_TCP, outbound=False)
    await s.call()
    s.closed(BOB_TCP)
    await s.call()
    assert invites(s) == [BOB_TCP, Flow("tcp", "192.0.2.20", 5070)]


async def test_a_refresh_over_the_same_flow_keeps_it_and_a_removal_forgets_it() -> None:
    s = site()
    await s.register(ob_contact(), BOB_TCP)
    await s.register(ob_contact(), BOB_TCP, cseq=2)
    await s.call()
    assert invites(s) == [BOB_TCP]
    await s.register(ob_contact() + ";expires=0", BOB_TCP, cseq=3)
    assert s.directory._flows == {}  # nothing kept for a flow no binding uses
    assert s.directory._outbound == {}


async def test_expired_bindings_are_swept_from_memory() -> None:
    s = site()
    await s.register(ob_contact(), BOB_TCP)
    assert s.directory.local
    s.clock.advance(3600 + 1)
    s.directory.sweep(s.clock())
    assert s.directory.local == {}
    assert s.directory._flows == {}


# --- NAT keep-alives --------------------------------------------------------------------------

ALICE = "sip:alice@example.com"
ALICE_NAT = Flow("udp", "198.51.100.30", 31000)  # her NAT's address for her phone
ALICE_CONTACT = "sip:alice@10.0.0.30:5060"


async def register_alice(s: Site, flow: Flow = ALICE_NAT, cseq: int = 1) -> None:
    via = f"SIP/2.0/UDP 10.0.0.30:5060;branch=z9hG4bKa{cseq};rport"
    req = request(
        "REGISTER", "sip:example.com", from_=ALICE, to=ALICE, call_id="reg@alice",
        cseq=cseq, vias=[via], contact=f"<{ALICE_CONTACT}>",
    )  # fmt: skip
    await s.registrar.handle(server_tx(req, flow))


def keepalive(s: Site) -> NatKeepalive:
    return NatKeepalive(
        s.directory, s.transactions, s.registrar, ME, s.counters, interval=30, clock=s.clock
    )


async def test_udp_bindings_without_outbound_or_path_are_pinged() -> None:
    s = site()
    await register_alice(s)
    await s.register(ob_contact(), BOB_UDP)  # outbound: bob keeps his own flow alive
    await s.register(ob_contact(), BOB_TCP, cseq=2)  # TCP: the connection is the pinhole
    ka = keepalive(s)
    assert ka.targets() == [(ALICE, ALICE_CONTACT, str(ALICE_NAT))]
    await ka.ping(ka.targets()[0])
    [ping] = s.transactions.started
    assert ping.method == "OPTIONS"
    assert ping.flow == ALICE_NAT  # to the NAT's address: that keeps the pinhole open
    assert ping.request.uri == ALICE_CONTACT
    assert ping.request.to.uri == ping.request.ruri
    assert s.counters.nat_keepalives_sent == 1


@pytest.mark.parametrize("status", [200, 404, 481, 503])
async def test_any_answer_keeps_the_binding(status: int) -> None:
    s = site()
    await register_alice(s)
    ka = keepalive(s)
    [key] = ka.targets()
    for _ in range(MISSES * 2):
        await ka.ping(key)
        s.transactions.started[-1].answer(status)
    assert [b.contact for b in await s.store.load(ALICE, s.clock())] == [ALICE_CONTACT]
    assert s.counters.nat_bindings_removed == 0


async def test_three_unanswered_in_a_row_remove_the_binding(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="proxy.nat_keepalive")
    s = site()
    await register_alice(s)
    ka = keepalive(s)
    [key] = ka.targets()
    await ka.ping(key)
    await ka.ping(key)  # one missed
    s.transactions.started[-1].answer(200)  # answered: the count starts again
    for _ in range(MISSES):
        await ka.ping(key)
    assert await s.store.load(ALICE, s.clock())  # three sent, the third not yet missed
    await ka.ping(key)
    assert await s.store.load(ALICE, s.clock()) == []
    assert s.counters.nat_bindings_removed == 1
    assert len(s.transactions.started) == 5  # nothing sent once it was gone
    assert f"removed {ALICE} at {ALICE_CONTACT}: 3 keep-alives to {ALICE_NAT}" in caplog.text
    assert ka.targets() == []


async def test_a_phone_that_registered_again_elsewhere_is_not_removed() -> None:
    s = site()
    await register_alice(s)
    ka = keepalive(s)
    [key] = ka.targets()
    for _ in range(MISSES):
        await ka.ping(key)
    moved = Flow("udp", ALICE_NAT.host, ALICE_NAT.port + 7)  # a NAT rebinding
    await register_alice(s, moved, cseq=2)
    await ka.ping(key)  # the old flow's third miss
    [binding] = await s.store.load(ALICE, s.clock())
    assert binding.source == str(moved)
    assert s.counters.nat_bindings_removed == 0


async def test_a_round_spreads_its_pings_over_the_interval() -> None:
    s = site()
    for i in range(40):
        flow = Flow("udp", "198.51.100.40", 20000 + i)
        req = request(
            "REGISTER", "sip:example.com", from_=f"sip:u{i}@example.com",
            to=f"sip:u{i}@example.com", call_id=f"reg@{i}",
            vias=[f"SIP/2.0/UDP 10.0.0.40:5060;branch=z9hG4bKu{i};rport"],
            contact=f"<sip:u{i}@10.0.0.40:5060>",
        )  # fmt: skip
        await s.registrar.handle(server_tx(req, flow))
    ka = NatKeepalive(
        s.directory, s.transactions, s.registrar, ME, s.counters, interval=1.0, clock=s.clock
    )
    loop = asyncio.get_running_loop()
    sent_at: list[float] = []
    start_client = s.transactions.start_client

    def timed(*args: object, **kw: object) -> object:
        sent_at.append(loop.time())
        return start_client(*args, **kw)  # type: ignore[arg-type]

    s.transactions.start_client = timed  # type: ignore[method-assign]
    task = loop.create_task(ka.run())
    await asyncio.sleep(0.95)
    task.cancel()
    assert len(sent_at) == 40
    # In slices of 0.1 s across the interval, not all at once.
    assert sent_at[-1] - sent_at[0] > 0.7
    assert max(sent_at.count(t) for t in sent_at) < 40


async def test_pings_in_flight_are_counted_until_answered_or_timed_out() -> None:
    # What a shutdown leaves out of the transactions it waits for.
    s = site()
    await register_alice(s)
    ka = keepalive(s)
    [key] = ka.targets()
    await ka.ping(key)
    await ka.ping(key)
    assert ka.inflight == 2
    first, second = s.transactions.started
    first.answer(100)  # provisional: still in flight
    assert ka.inflight == 2
    first.answer(200)
    first.answer(200)  # a retransmitted answer counts once
    second.time_out()
    second.time_out()
    assert ka.inflight == 0

"""Router: where a proxied request goes, driven with fake transactions, a fake resolver,
an in-memory store, a fake DHT locator and a manual clock. The forker is the real one,
so each test sees the requests exactly as they would leave the proxy.

The relay policy decides much of what happens: a request to a user of a served domain is
delivered for anyone, anywhere else only for an authenticated local user (a site without
users relays for nobody), and an in-dialog request only when our Record-Route in it
carries the dialog's token."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import cast

import pytest

from dht_adaptor.keys import SiteKey, TrustStore
from dht_adaptor.location import MemoryStore
from proxy.auth_gate import AuthGate
from proxy.dht_routing import DhtRouter
from proxy.directory import LocalDirectory
from proxy.forker import Forker
from proxy.location import LocationUnavailable
from proxy.relay_auth import HEADER as RELAY_HEADER
from proxy.relay_auth import RelayVerifier
from proxy.relay_auth import sign as sign_relay
from proxy.resolver import Resolver
from proxy.router import Router
from proxy.sip.binding import Binding
from proxy.sip.errors import Forbidden, NotFound, TemporarilyUnavailable
from proxy.sip.message import Request, Response, error_response, make_response, parse_message
from proxy.stats import SipCounters
from proxy.transactions import ServerTx
from proxy.transport import Flow

from .fakes import (
    ME,
    PHONE,
    TOKENS,
    FakeLocator,
    FakeResolver,
    FakeTransactions,
    FakeUsers,
    HomeRecord,
    ManualClock,
    Spawner,
    digest_answer,
    md5_challenge,
    server_tx,
)
from .messages import PHONE_VIA, request

BOB = "sip:bob@example.com"
BOB_DESK = "sip:bob@192.0.2.20:5070"
BOB_MOBILE = "sip:bob@192.0.2.21:5080"
SITE_B = "sip:198.51.100.7:5060"
SITE_C = "sip:198.51.100.8:5070;transport=tcp"
FLOW_B = Flow("udp", "198.51.100.7", 5060)
FLOW_C = Flow("tcp", "198.51.100.8", 5070)
FROM_TAG = "f00d"  # the caller's tag in every request of .messages
CALL_ID = "call-1@192.0.2.10"
# Our Record-Route in the dialog of CALL_ID, as in-dialog requests bring it back.
OUR_RR = ME.rr_uri("udp", TOKENS.dialog(CALL_ID, FROM_TAG))
OUR_KEY = SiteKey.generate()  # this site's key: it signs what we relay
MEMBER = SiteKey.generate()  # another member site: it relays to us
STRANGER = SiteKey.generate()  # not in our trust folder
TRUST = TrustStore({k.key_id: k.public_bytes for k in (OUR_KEY, MEMBER)})


@dataclass
class Proxy:
    router: Router
    transactions: FakeTransactions
    store: MemoryStore
    directory: LocalDirectory
    locator: FakeLocator
    resolver: FakeResolver
    sent: list[tuple[Flow, bytes]]
    spawner: Spawner
    counters: SipCounters
    clock: ManualClock
    users: FakeUsers

    async def bind(self, contact: str, *, aor: str = BOB, q: float = 1.0, **kw: object) -> None:
        """``contact`` registers for ``aor`` (as the registrar would store it)."""
        now = self.clock()
        old = await self.store.load(aor, now)
        new = [*old, Binding(aor, contact, now + 600, q=q, **kw)]  # type: ignore[arg-type]
        await self.store.save(aor, new, now)
        self.directory.note(aor, old, new)

    async def route(self, req: Request) -> ServerTx:
        stx = server_tx(req)
        await self.router.route(stx)
        return stx


def proxy(
    *,
    dht: bool = False,
    users: tuple[tuple[str, str], ...] = (),
    trust: TrustStore = TRUST,
) -> Proxy:
    clock = ManualClock()
    transactions = FakeTransactions()
    store = MemoryStore()
    fake_users = FakeUsers()
    for name, password in users:
        fake_users.add(name, password)
    counters = SipCounters()
    directory = LocalDirectory(store, fake_users, clock)
    auth = AuthGate(
        fake_users, "example.com", b"s" * 32,
        transactions=transactions, counters=counters, clock=clock,
    )  # fmt: skip
    locator = FakeLocator(clock)
    resolver = FakeResolver()
    sent: list[tuple[Flow, bytes]] = []
    spawner = Spawner()
    router = Router(
        identity=ME, transactions=transactions, directory=directory, auth=auth,
        # Router asks for the concrete Resolver (a class, no Protocol) although it uses
        # three methods of it; the fake has those three.
        resolver=cast(Resolver, resolver),
        forker=Forker(transactions, ME, TOKENS, timer_c=180.0), counters=counters,
        send=lambda flow, data: sent.append((flow, data)), spawn=spawner, tokens=TOKENS,
        dht=DhtRouter(locator, counters) if dht else None,
        relay_key=OUR_KEY, relays=RelayVerifier(trust), clock=clock,
    )  # fmt: skip
    return Proxy(
        router, transactions, store, directory, locator, resolver, sent, spawner, counters,
        clock, fake_users,
    )  # fmt: skip


def invite(ruri: str = BOB, **kw: object) -> Request:
    return request("INVITE", ruri, **kw)


def relayed(req: Request, clock: ManualClock, key: SiteKey = MEMBER) -> Request:
    """``req`` as a member site relays it: with its signed proof."""
    req.headers.add(RELAY_HEADER, sign_relay(req, key, clock()))
    return req


ALICE = ("alice", "wonderland")  # a local user, for sites with users
CNONCES = itertools.count(1)  # a phone's cnonce is new for every request it authenticates


async def as_alice(p: Proxy, method: str, ruri: str, **kw: object) -> ServerTx:
    """Send a request the way a phone of alice does: challenged first, then again with
    her credentials. Returns the second request's transaction."""
    [challenge] = p.transactions.sent_to(await p.route(request(method, ruri, **kw)))
    assert challenge.status == 407
    value = digest_answer(
        md5_challenge(challenge, "Proxy-Authenticate"), username=ALICE[0],
        password=ALICE[1], method=method, uri=ruri, cnonce=f"{next(CNONCES):08x}",
    )  # fmt: skip
    extra = [*cast(list[str], kw.pop("extra", [])), f"Proxy-Authorization: {value}"]
    return await p.route(request(method, ruri, cseq=2, extra=extra, **kw))


# --- local users ---------------------------------------------------------------------------


async def test_a_local_user_is_forked_to_every_binding_best_q_first() -> None:
    p = proxy()
    await p.bind(BOB_DESK, q=0.5)
    await p.bind(BOB_MOBILE, q=1.0)
    stx = await p.route(invite())
    branches = p.transactions.branches()
    assert [b.request.uri for b in branches] == [BOB_MOBILE, BOB_DESK]
    assert [b.flow for b in branches] == [
        Flow("udp", "192.0.2.21", 5080),
        Flow("udp", "192.0.2.20", 5070),
    ]
    for b in branches:
        ours, theirs = b.request.headers.get_all("Via")
        assert ours.startswith("SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-")
        assert theirs == PHONE_VIA
        # Our Record-Route carries the dialog's token: in-dialog requests bring it back.
        assert b.request.headers.get_all("Record-Route") == [OUR_RR]
        assert b.request.max_forwards == 69
    # Two branches, two transactions: their branch parameters differ.
    assert len({b.request.top_via.branch for b in branches}) == 2
    assert p.transactions.sent_to(stx) == []  # the answer comes from a phone
    assert p.counters.calls_routed_local == 1


async def test_the_phones_answers_go_upstream_without_our_via() -> None:
    p = proxy()
    await p.bind(BOB_DESK)
    stx = await p.route(invite())
    [branch] = p.transactions.branches()
    branch.answer(180)
    branch.answer(200)
    assert p.transactions.statuses(stx) == [180, 200]
    assert all(r.headers.get_all("Via") == [PHONE_VIA] for r in p.transactions.sent_to(stx))


EDGE = "<sip:198.51.100.30:5060;transport=tcp;lr>"
EDGE_TCP = "tcp:198.51.100.30:49152"  # the connection bob's REGISTER came through
BOB_BEHIND_EDGE = "sip:bob@10.0.0.5:5060"


async def test_a_binding_with_a_path_is_reached_through_it() -> None:
    # RFC 3327 §5.3: bob registered through an edge proxy (Path). While we hold its
    # connection, the request goes back over it.
    p = proxy()
    p.resolver.connections.add(("198.51.100.30", 49152))
    await p.bind(BOB_BEHIND_EDGE, path=(EDGE,), source=EDGE_TCP)
    await p.route(invite())
    [branch] = p.transactions.branches()
    assert branch.flow == Flow.parse(EDGE_TCP)
    assert branch.request.uri == BOB_BEHIND_EDGE
    assert branch.request.headers.values("Route") == [EDGE]


async def test_a_binding_with_a_path_is_reached_through_it_after_its_connection_closed() -> None:
    # Regression: the request went to the contact itself (a private address behind the
    # edge proxy), Route header and all, instead of to the first Path entry.
    p = proxy()
    await p.bind(BOB_BEHIND_EDGE, path=(EDGE,), source=EDGE_TCP)
    await p.route(invite())
    [branch] = p.transactions.branches()
    assert branch.flow == Flow("tcp", "198.51.100.30", 5060)
    assert branch.request.uri == BOB_BEHIND_EDGE
    assert branch.request.headers.values("Route") == [EDGE]


async def test_a_non_dialog_request_is_not_record_routed() -> None:
    p = proxy()
    await p.bind(BOB_DESK)
    await p.route(request("MESSAGE", BOB))
    [branch] = p.transactions.branches("MESSAGE")
    assert branch.request.headers.get_all("Record-Route") == []


async def test_an_unknown_user_is_not_found() -> None:
    p = proxy()
    req = invite("sip:nobody@example.com")
    with pytest.raises(NotFound) as caught:
        await p.route(req)
    assert error_response(req, caught.value).status == 404
    assert p.transactions.started == []


async def test_a_known_aor_whose_bindings_expired_is_temporarily_unavailable() -> None:
    # On a site without users anyone may register, so every caller learns it.
    p = proxy()
    await p.bind(BOB_DESK)
    p.clock.advance(601)
    req = invite()
    with pytest.raises(TemporarilyUnavailable) as caught:
        await p.route(req)
    assert error_response(req, caught.value).status == 480
    assert p.transactions.started == []


async def test_a_known_user_without_binding_is_480_to_a_local_user_only() -> None:
    p = proxy(users=(ALICE, ("bob", "builder")))  # bob is in the users file
    # A caller from outside cannot tell "no such user" from "not reachable now".
    with pytest.raises(NotFound):
        await p.route(invite(from_="sip:carol@other.example.org"))
    with pytest.raises(NotFound):
        await p.route(invite("sip:nobody@example.com", from_="sip:carol@other.example.org"))
    # Alice, authenticated, is told.
    with pytest.raises(TemporarilyUnavailable):
        await as_alice(p, "INVITE", BOB)
    with pytest.raises(NotFound):
        await as_alice(p, "INVITE", "sip:nobody@example.com", call_id="call-2")


async def test_bindings_that_cannot_be_reached_are_temporarily_unavailable() -> None:
    p = proxy()
    await p.bind("sip:bob@desk.invalid:5070")  # the name does not resolve
    with pytest.raises(TemporarilyUnavailable):
        await p.route(invite())


async def test_unreachable_bindings_are_404_to_outsiders() -> None:
    # Regression: bindings that all failed to resolve answered 480 to anyone, telling an
    # outsider that the user exists (the relay policy gives outsiders 404 for both).
    p = proxy(users=(ALICE,))
    await p.bind("sip:bob@desk.invalid:5070")
    with pytest.raises(NotFound):
        await p.route(invite(from_="sip:carol@other.example.org"))
    with pytest.raises(TemporarilyUnavailable):
        await as_alice(p, "INVITE", BOB)


async def test_an_unreachable_binding_is_skipped() -> None:
    p = proxy()
    await p.bind("sip:bob@desk.invalid:5070", q=1.0)
    await p.bind(BOB_DESK, q=0.5)
    await p.route(invite())
    assert [b.request.uri for b in p.transactions.branches()] == [BOB_DESK]


# --- through the DHT -------------------------------------------------------------------------


async def test_with_no_local_binding_the_request_goes_to_the_home_proxies() -> None:
    p = proxy(dht=True)
    p.locator.bindings[BOB] = [HomeRecord(SITE_B, q=0.5), HomeRecord(SITE_C, q=0.9)]
    stx = await p.route(invite())
    branches = p.transactions.branches()
    assert [b.flow for b in branches] == [FLOW_C, FLOW_B]
    assert {b.request.uri for b in branches} == {"sip:bob@example.com;p2psip=home"}
    assert branches[0].request.headers.get_all("Via")[0].startswith("SIP/2.0/TCP 203.0.113.5")
    # UDP in, TCP out: we Record-Route once per transport.
    token = TOKENS.dialog(CALL_ID, FROM_TAG)
    assert branches[0].request.headers.get_all("Record-Route") == [
        ME.rr_uri("tcp", token),
        ME.rr_uri("udp", token),
    ]
    assert p.counters.calls_routed_dht == 1
    assert p.transactions.sent_to(stx) == []


async def test_a_local_binding_wins_over_the_dht() -> None:
    p = proxy(dht=True)
    p.locator.bindings[BOB] = [HomeRecord(SITE_B)]
    await p.bind(BOB_DESK)
    await p.route(invite())
    assert [b.request.uri for b in p.transactions.branches()] == [BOB_DESK]
    assert p.locator.lookups == []


async def test_a_relayed_request_never_goes_to_the_dht() -> None:
    p = proxy(dht=True)
    p.locator.bindings[BOB] = [HomeRecord(SITE_B)]
    with pytest.raises(NotFound):
        await p.route(relayed(invite("sip:bob@example.com;p2psip=home"), p.clock))
    assert p.locator.lookups == []
    assert p.transactions.started == []


async def test_a_relayed_request_reaches_the_local_binding() -> None:
    p = proxy(dht=True)
    await p.bind(BOB_DESK)
    await p.route(relayed(invite("sip:bob@example.com;p2psip=home"), p.clock))
    [branch] = p.transactions.branches()
    assert branch.request.uri == BOB_DESK
    assert RELAY_HEADER not in branch.request.headers  # the proof stops here


async def test_what_we_relay_carries_our_proof() -> None:
    p = proxy(dht=True)
    p.locator.bindings[BOB] = [HomeRecord(SITE_B)]
    await p.route(invite())
    [branch] = p.transactions.branches()
    # The home proxy (which trusts our key) accepts it, once.
    home = RelayVerifier(TrustStore({OUR_KEY.key_id: OUR_KEY.public_bytes}))
    assert home.verify(branch.request, p.clock()) == OUR_KEY.key_id
    assert home.verify(branch.request, p.clock()) is None  # a replay


@pytest.mark.parametrize("how", ["none", "stranger", "stale", "tampered", "replayed"])
async def test_a_relay_marker_without_a_valid_proof_is_refused(how: str) -> None:
    p = proxy(dht=True)
    await p.bind(BOB_DESK)
    req = invite("sip:bob@example.com;p2psip=home")
    if how == "stranger":
        relayed(req, p.clock, STRANGER)
    elif how == "stale":
        req.headers.add(RELAY_HEADER, sign_relay(req, MEMBER, p.clock() - 60))
    elif how == "tampered":
        relayed(req, p.clock)
        req.headers.set("From", "<sip:mallory@evil.test>;tag=1")
    elif how == "replayed":
        relayed(req, p.clock)
        await p.route(req.copy())  # the first one is fine
        p.transactions.started.clear()
    with pytest.raises(Forbidden):
        await p.route(req)
    assert p.transactions.started == []
    assert p.counters.relay_forged == 1


async def test_the_dht_unavailable_is_a_503_with_retry_after() -> None:
    p = proxy(dht=True)
    p.locator.failure = LocationUnavailable("no node answered")
    req = invite()
    with pytest.raises(LocationUnavailable) as caught:
        await p.route(req)
    resp = error_response(req, caught.value)
    assert (resp.status, resp.headers.get("Retry-After")) == (503, "5")
    assert p.transactions.started == []


async def test_a_user_the_dht_knows_but_no_other_site_holds_is_temporarily_unavailable() -> None:
    p = proxy(dht=True)
    p.locator.bindings[BOB] = [HomeRecord(p.locator.home)]  # stale: we hold no binding
    with pytest.raises(TemporarilyUnavailable):
        await p.route(invite())
    assert p.transactions.started == []


async def test_a_user_known_to_the_dht_only_by_tombstones_is_404_to_outsiders() -> None:
    p = proxy(dht=True, users=(ALICE,))
    p.locator.bindings[BOB] = [HomeRecord(SITE_B, expires_at=p.clock() - 1)]
    with pytest.raises(NotFound):
        await p.route(invite(from_="sip:carol@other.example.org"))
    with pytest.raises(TemporarilyUnavailable):
        await as_alice(p, "INVITE", BOB)


async def test_cached_home_proxies_that_fail_are_retried_after_a_fresh_lookup() -> None:
    p = proxy(dht=True)
    p.locator.bindings[BOB] = [HomeRecord(SITE_B)]
    first = await p.route(invite(call_id="call-1"))
    [to_b] = p.transactions.branches()
    to_b.answer(200)
    assert p.transactions.statuses(first) == [200]

    p.locator.bindings[BOB] = [HomeRecord(SITE_C)]  # bob moved to site C
    second = await p.route(invite(call_id="call-2"))  # from the cache: site B again
    stale = p.transactions.branches()[-1]
    assert stale.flow == FLOW_B
    stale.answer(480)
    await p.spawner.drain()
    assert p.transactions.statuses(second) == []  # the 480 is held for the retry
    retry = p.transactions.branches()[-1]
    assert retry.flow == FLOW_C
    assert retry.request.uri == "sip:bob@example.com;p2psip=home"
    retry.answer(200)
    assert p.transactions.statuses(second) == [200]
    assert p.locator.lookups == [BOB, BOB]
    assert p.counters.dht_retries == 1


async def test_a_retry_that_finds_the_same_home_proxies_answers_the_held_failure() -> None:
    p = proxy(dht=True)
    p.locator.bindings[BOB] = [HomeRecord(SITE_B)]
    await p.route(invite(call_id="call-1"))
    p.transactions.branches()[-1].answer(200)
    stx = await p.route(invite(call_id="call-2"))
    p.transactions.branches()[-1].time_out()
    await p.spawner.drain()
    assert p.transactions.statuses(stx) == [408]
    assert len(p.transactions.branches()) == 2  # nothing new was tried
    assert p.counters.dht_retries == 0


async def test_a_failure_not_from_the_cache_is_answered_at_once() -> None:
    p = proxy(dht=True)
    p.locator.bindings[BOB] = [HomeRecord(SITE_B)]
    stx = await p.route(invite())
    p.transactions.branches()[-1].answer(480)
    assert p.transactions.statuses(stx) == [480]
    assert p.spawner.tasks == []


# --- Route and in-dialog requests ---------------------------------------------------------


NEXT_HOP = "<sip:198.51.100.9:5080;lr>"


async def test_an_in_dialog_request_through_our_record_route_goes_to_the_next_route() -> None:
    p = proxy()
    req = request("BYE", BOB_DESK, to_tag="b0b", extra=[f"Route: {OUR_RR}, {NEXT_HOP}"])
    await p.route(req)
    [branch] = p.transactions.branches("BYE")
    assert branch.flow == Flow("udp", "198.51.100.9", 5080)
    assert branch.request.uri == BOB_DESK  # loose routing: unchanged
    assert branch.request.headers.values("Route") == [NEXT_HOP]


async def test_an_in_dialog_request_without_our_token_is_not_relayed() -> None:
    p = proxy()
    forged = ME.rr_uri("udp", TOKENS.dialog("another-call", FROM_TAG))
    for route in (f"<sip:203.0.113.5:5060;lr>, {NEXT_HOP}", f"{forged}, {NEXT_HOP}", NEXT_HOP):
        with pytest.raises(Forbidden):
            await p.route(request("BYE", BOB_DESK, to_tag="b0b", extra=[f"Route: {route}"]))
    assert p.transactions.started == []
    assert p.counters.relay_denied == 3


async def test_a_preloaded_route_is_followed_for_a_local_user_only() -> None:
    p = proxy(users=(ALICE,))
    # From outside: only a local user may send us elsewhere, so prove you are one.
    outsider = await p.route(
        invite(from_="sip:carol@other.example.org", extra=[f"Route: {NEXT_HOP}"])
    )
    assert p.transactions.statuses(outsider) == [407]
    assert p.transactions.started == []
    stx = await as_alice(p, "INVITE", BOB, call_id="call-2", extra=[f"Route: {NEXT_HOP}"])
    assert p.transactions.sent_to(stx) == []
    [branch] = p.transactions.branches()
    assert branch.flow == Flow("udp", "198.51.100.9", 5080)
    assert branch.request.uri == BOB


async def test_a_site_without_users_relays_for_nobody() -> None:
    p = proxy()
    with pytest.raises(Forbidden):
        await p.route(invite(extra=[f"Route: {NEXT_HOP}"]))
    with pytest.raises(Forbidden):
        await p.route(invite("sip:bob@198.51.100.9"))  # a host we do not serve
    assert p.transactions.started == []


# --- requests to the proxy, stateless forwarding --------------------------------------------


@pytest.mark.parametrize("ruri", ["sip:203.0.113.5:5060", "sip:example.com"])
async def test_options_to_the_proxy_is_answered_200_with_allow(ruri: str) -> None:
    p = proxy()
    req = request("OPTIONS", ruri)
    assert p.router.is_for_me(req)
    stx = server_tx(req)
    p.router.answer_locally(stx)
    [resp] = p.transactions.sent_to(stx)
    assert resp.status == 200
    allow = {m.strip() for m in (resp.headers.get("Allow") or "").split(",")}
    assert {"INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER"} <= allow


async def test_other_requests_to_the_proxy_are_not_allowed() -> None:
    p = proxy()
    stx = server_tx(request("MESSAGE", "sip:example.com"))
    p.router.answer_locally(stx)
    [resp] = p.transactions.sent_to(stx)
    assert (resp.status, resp.headers.get("Allow")) == (405, "OPTIONS, REGISTER")


def test_requests_to_users_or_elsewhere_are_not_for_the_proxy() -> None:
    p = proxy()
    assert not p.router.is_for_me(request("OPTIONS", BOB))
    assert not p.router.is_for_me(request("OPTIONS", "sip:198.51.100.9"))
    assert not p.router.is_for_me(
        request("OPTIONS", "sip:example.com", extra=["Route: <sip:198.51.100.9;lr>"])
    )


def ack(branch: str = "z9hG4bKack1", route: str | None = OUR_RR) -> Request:
    return request(
        "ACK", BOB_DESK, to_tag="b0b", vias=[f"SIP/2.0/UDP 192.0.2.10:5060;branch={branch}"],
        extra=[f"Route: {route}"] if route else [],
    )  # fmt: skip


async def test_an_ack_is_forwarded_statelessly_with_a_deterministic_branch() -> None:
    p = proxy()
    p.router.forward_ack(ack(), PHONE)
    p.router.forward_ack(ack(), PHONE)  # retransmitted
    p.router.forward_ack(ack("z9hG4bKack2"), PHONE)  # another ACK
    await p.spawner.drain()
    assert [flow for flow, _ in p.sent] == [Flow("udp", "192.0.2.20", 5070)] * 3
    sent = [parse_message(data) for _, data in p.sent]
    assert all(isinstance(m, Request) and m.method == "ACK" for m in sent)
    branches = [m.top_via.branch for m in sent]
    assert branches[0] == branches[1] != branches[2]
    assert sent[0].headers.get_all("Via")[0].startswith("SIP/2.0/UDP 203.0.113.5:5060;")
    assert sent[0].headers.get_all("Route") == []  # ours was consumed
    assert p.transactions.started == []  # no transaction for an ACK


async def test_an_ack_to_a_phone_registered_here_is_forwarded() -> None:
    p = proxy()
    await p.bind(BOB_DESK, source="udp:198.51.100.40:41000")  # bob behind NAT
    p.router.forward_ack(ack(route=None), PHONE)
    await p.spawner.drain()
    assert [flow for flow, _ in p.sent] == [Flow("udp", "198.51.100.40", 41000)]


async def test_an_ack_not_for_a_dialog_through_us_is_dropped() -> None:
    p = proxy()
    p.router.forward_ack(ack(route=None), PHONE)  # to a phone we know nothing of
    p.router.forward_ack(ack(route=f"<sip:203.0.113.5:5060;lr>, {NEXT_HOP}"), PHONE)
    p.router.forward_ack(request("ACK", "sip:bob@nowhere.invalid", to_tag="b0b"), PHONE)
    await p.spawner.drain()
    assert p.sent == []


async def forwarded_invite(p: Proxy) -> Request:
    """An INVITE the proxy forwarded to bob's phone, as it went out."""
    await p.bind(BOB_DESK)
    await p.route(invite())
    [branch] = p.transactions.branches()
    return branch.request


async def test_a_stray_2xx_to_our_branch_goes_to_the_next_via() -> None:
    # §16.7 step 5: a 2xx retransmitted after the INVITE's client transaction ended.
    p = proxy()
    upstream = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKup;received=192.0.2.99;rport=5999"
    await p.bind(BOB_DESK)
    await p.route(invite(vias=[upstream]))
    [branch] = p.transactions.branches()
    p.router.forward_stray_response(make_response(branch.request, 200, to_tag="b0b"))
    [(flow, data)] = p.sent
    assert flow == Flow("udp", "192.0.2.99", 5999)
    fwd = parse_message(data)
    assert isinstance(fwd, Response) and fwd.status == 200
    assert fwd.headers.get_all("Via") == [upstream]


async def test_stray_responses_we_did_not_cause_are_dropped() -> None:
    p = proxy()
    sent = await forwarded_invite(p)
    ours = sent.headers.get_all("Via")[0]
    made_up = ours.replace(sent.top_via.branch or "", "z9hG4bK-0123456789ab-feedfacecafe")
    elsewhere = "SIP/2.0/UDP 198.51.100.66:5060;branch=z9hG4bKvictim"
    for vias in (
        [made_up, PHONE_VIA],  # a branch we never made
        [ours, elsewhere],  # our branch, but for another upstream Via
        [PHONE_VIA, elsewhere],  # not our Via on top
        [ours],  # nowhere to go
    ):
        p.router.forward_stray_response(make_response(invite(vias=vias), 200, to_tag="b0b"))
    p.router.forward_stray_response(make_response(sent, 180, to_tag="b0b"))  # not a 2xx
    p.router.forward_stray_response(
        make_response(request("MESSAGE", BOB, vias=sent.headers.get_all("Via")), 200)
    )  # a 2xx, but not to an INVITE
    assert p.sent == []


# --- authentication ----------------------------------------------------------------------------


async def test_a_local_users_invite_is_challenged_407() -> None:
    p = proxy(users=(ALICE,))
    await p.bind(BOB_DESK)
    stx = await p.route(invite())
    [resp] = p.transactions.sent_to(stx)
    assert resp.status == 407
    assert md5_challenge(resp, "Proxy-Authenticate").startswith('Digest realm="example.com"')
    assert p.transactions.started == []


async def test_with_credentials_the_invite_goes_on_asserting_who_sent_it() -> None:
    p = proxy(users=(ALICE,))
    await p.bind(BOB_DESK)
    stx = await as_alice(p, "INVITE", BOB)
    assert p.transactions.sent_to(stx) == []
    [branch] = p.transactions.branches()
    assert branch.request.uri == BOB_DESK
    assert "Proxy-Authorization" not in branch.request.headers  # §22.3: consumed here
    assert branch.request.headers.get_all("P-Asserted-Identity") == ["<sip:alice@example.com>"]


async def test_an_authenticated_user_may_not_send_as_another() -> None:
    p = proxy(users=(ALICE, ("bob", "builder")))
    await p.bind(BOB_DESK)
    with pytest.raises(Forbidden):
        await as_alice(p, "INVITE", BOB, from_="sip:bob@example.com")
    assert p.transactions.started == []
    assert p.counters.identity_mismatch == 1


async def test_a_call_from_another_domain_is_not_challenged_nor_asserted() -> None:
    p = proxy(users=(ALICE,))
    await p.bind(BOB_DESK)
    forged = "P-Asserted-Identity: <sip:alice@example.com>"
    await p.route(invite(from_="sip:carol@other.example.org", extra=[forged]))
    [branch] = p.transactions.branches()
    assert branch.request.uri == BOB_DESK
    assert "P-Asserted-Identity" not in branch.request.headers


@pytest.mark.parametrize(("scope", "kept"), [(None, True), ("example.com", True),
                                            ("other.example", False)])  # fmt: skip
async def test_a_member_site_asserts_only_callers_within_its_scope(
    scope: str | None, kept: bool
) -> None:
    from dht_adaptor.trust_folder import Scope

    scoped = TrustStore(
        {k.key_id: k.public_bytes for k in (OUR_KEY, MEMBER)},
        scopes={MEMBER.key_id: Scope.parse([scope])} if scope else None,
    )
    p = proxy(dht=True, trust=scoped)
    await p.bind(BOB_DESK)
    req = invite("sip:bob@example.com;p2psip=home")
    req.headers.add("P-Asserted-Identity", "<sip:alice@example.com>")
    await p.route(relayed(req, p.clock))
    [branch] = p.transactions.branches()
    assert ("P-Asserted-Identity" in branch.request.headers) is kept

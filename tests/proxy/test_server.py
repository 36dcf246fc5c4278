"""SipServer: from received bytes to the handler, over a real TransactionLayer whose
transport is a FakeSender. The registrar and router are fakes that record what reached
them (one test uses the real registrar); assertions are on the bytes the proxy sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import pytest

from dht_adaptor.adaptor import TooManyBindings
from dht_adaptor.location import MemoryStore
from proxy.auth_gate import AuthGate
from proxy.directory import LocalDirectory
from proxy.location import LocationUnavailable
from proxy.registrar_service import RegistrarService
from proxy.router import Router
from proxy.server import SipServer
from proxy.sip.errors import IntervalTooBrief, NotFound, SipError
from proxy.sip.message import Request, Response, make_response, parse_message
from proxy.sip.registrar import RegistrarConfig
from proxy.sip.uri import SipUri
from proxy.stats import SipCounters
from proxy.tasks import Tasks
from proxy.transactions import ServerTx, TransactionLayer
from proxy.transport import Flow, TransportLayer

from .fakes import ME, PHONE, TIMERS, FakePublisher, FakeSender, FakeUsers, ManualClock
from .messages import PHONE_VIA, request_bytes
from .messages import phone_via as via

BOB = "sip:bob@example.com"


class FakeRegistrar:
    """Answers 200 unless ``error`` is set; waits for ``gate`` first when it is set."""

    def __init__(self, transactions: TransactionLayer) -> None:
        self._transactions = transactions
        self.handled: list[ServerTx] = []
        self.error: SipError | None = None
        self.gate: asyncio.Event | None = None

    async def handle(self, stx: ServerTx) -> None:
        self.handled.append(stx)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        self._transactions.respond(stx, make_response(stx.request, 200, to_tag=stx.to_tag))


class FakeRouter:
    """Records what it is asked to route; never answers unless told to."""

    def __init__(self, transactions: TransactionLayer) -> None:
        self._transactions = transactions
        self.routed: list[ServerTx] = []
        self.local: list[ServerTx] = []
        self.acks: list[Request] = []
        self.strays: list[Response] = []
        self.error: SipError | None = None
        self.on_cancel: Callable[[], None] | None = None

    def is_for_me(self, req: Request) -> bool:
        ruri = req.ruri
        return isinstance(ruri, SipUri) and ruri.user is None and ME.is_my_address(ruri)

    def answer_locally(self, stx: ServerTx) -> None:
        self.local.append(stx)
        self._transactions.respond(stx, make_response(stx.request, 200, to_tag=stx.to_tag))

    async def route(self, stx: ServerTx) -> None:
        self.routed.append(stx)
        if self.error is not None:
            raise self.error
        stx.on_cancel = self.on_cancel

    def forward_ack(self, req: Request, flow: Flow) -> None:
        self.acks.append(req)

    def forward_stray_response(self, resp: Response) -> None:
        self.strays.append(resp)


@dataclass
class Harness:
    server: SipServer
    sender: FakeSender
    transactions: TransactionLayer
    registrar: FakeRegistrar
    router: FakeRouter
    counters: SipCounters

    async def receive(self, data: bytes, flow: Flow = PHONE) -> None:
        """One datagram arrives; then the tasks it started run as far as they can."""
        self.server.on_message(data, flow)
        await settle()

    def responses(self) -> list[Response]:
        return [r for _, r in self.sender.responses()]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def build(
    sender: FakeSender,
    transactions: TransactionLayer,
    counters: SipCounters,
    registrar: object,
    router: object,
) -> SipServer:
    # SipServer is typed with the concrete TransportLayer, RegistrarService and Router,
    # although it uses a few methods of each: the fakes stand in by duck typing.
    return SipServer(
        cast(TransportLayer, sender), transactions,
        registrar=cast(RegistrarService, registrar), router=cast(Router, router),
        counters=counters, tasks=Tasks("request task"),
    )  # fmt: skip


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    sender = FakeSender()
    counters = SipCounters()
    transactions = TransactionLayer(sender, TIMERS, counters)
    registrar = FakeRegistrar(transactions)
    router = FakeRouter(transactions)
    server = build(sender, transactions, counters, registrar, router)
    yield Harness(server, sender, transactions, registrar, router, counters)
    await server.close()


def cancel_for(invite: bytes) -> bytes:
    """The CANCEL a phone sends for ``invite`` (RFC 3261 §9.1: same Via, CSeq number)."""
    msg = parse_message(invite)
    assert isinstance(msg, Request)
    lines = [f"CANCEL {msg.uri} SIP/2.0"]
    for name in ("Via", "To", "From", "Call-ID"):
        lines += [f"{name}: {v}" for v in msg.headers.get_all(name)]
    lines += [f"CSeq: {msg.cseq.number} CANCEL", "Max-Forwards: 70", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- messages that cannot be handled ------------------------------------------------------


async def test_a_request_with_a_malformed_header_gets_400(h: Harness) -> None:
    data = request_bytes("INVITE", BOB).replace(b"Max-Forwards: 70", b"Max-Forwards: many")
    await h.receive(data)
    [(flow, resp)] = h.sender.responses()
    assert resp.status == 400
    assert flow == PHONE
    assert h.router.routed == []


async def test_a_request_whose_content_length_lies_gets_400(h: Harness) -> None:
    data = request_bytes("OPTIONS", BOB).replace(b"Content-Length: 0", b"Content-Length: 99")
    await h.receive(data)
    [(flow, resp)] = h.sender.responses()
    assert resp.status == 400
    assert resp.call_id == "call-1@192.0.2.10"
    assert flow == PHONE
    assert h.counters.parse_errors == 1


async def test_an_unparsable_request_is_answered_where_it_came_from(h: Harness) -> None:
    # RFC 3581: the phone asked with ;rport, and sits behind NAT.
    natted = Flow("udp", "198.51.100.99", 40000)
    data = request_bytes("OPTIONS", BOB).replace(b"Content-Length: 0", b"Content-Length: 99")
    await h.receive(data, natted)
    [(flow, resp)] = h.sender.responses()
    assert (flow, resp.status) == (natted, 400)
    assert (resp.top_via.received, resp.top_via.rport) == ("198.51.100.99", "40000")


async def test_an_unsupported_sip_version_gets_505(h: Harness) -> None:
    data = request_bytes("INVITE", BOB).replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1)
    await h.receive(data)
    assert h.sender.statuses() == [505]
    assert h.router.routed == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1),
        lambda d: d.replace(b"Content-Length: 0", b"Content-Length: 99"),
        lambda d: d.replace(b"Max-Forwards: 70", b"Max-Forwards: many"),
    ],
    ids=["version", "content-length", "header"],
)
async def test_a_bad_ack_is_never_answered(h: Harness, breakage: Callable[[bytes], bytes]) -> None:
    await h.receive(breakage(request_bytes("ACK", BOB, to_tag="b0b")))
    assert h.sender.sent == []
    assert h.router.acks == []


async def test_garbage_is_dropped(h: Harness) -> None:
    await h.receive(b"\x00\xff hello\r\n\r\n")
    await h.receive(b"INVITE sip:bob@example.com SIP/2.0\r\nVia: nothing ends")
    assert h.sender.sent == []
    assert h.counters.parse_errors == 2


async def test_a_malformed_response_is_dropped(h: Harness) -> None:
    await h.receive(b"SIP/2.0 200 OK\r\nContent-Length: 99\r\n\r\n")
    await h.receive(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 203.0.113.5\r\nContent-Length: 0\r\n\r\n")
    assert h.sender.sent == []
    assert h.router.strays == []


# --- requests to their handlers ----------------------------------------------------------------


async def test_requests_reach_their_handlers(h: Harness) -> None:
    await h.receive(request_bytes("REGISTER", "sip:example.com", call_id="r", vias=[via("r")]))
    await h.receive(request_bytes("INVITE", BOB, call_id="i", vias=[via("i")]))
    await h.receive(request_bytes("OPTIONS", "sip:203.0.113.5:5060", call_id="o", vias=[via("o")]))
    await h.receive(request_bytes("ACK", BOB, call_id="a", to_tag="b0b", vias=[via("a")]))
    assert [s.request.call_id for s in h.registrar.handled] == ["r"]
    assert [s.request.call_id for s in h.router.routed] == ["i"]
    assert [s.request.call_id for s in h.router.local] == ["o"]
    assert [r.call_id for r in h.router.acks] == ["a"]


async def test_the_handler_sees_where_the_request_really_came_from(h: Harness) -> None:
    await h.receive(request_bytes("INVITE", BOB), Flow("udp", "198.51.100.99", 40000))
    [stx] = h.router.routed
    assert stx.request.top_via.received == "198.51.100.99"
    assert stx.request.top_via.rport == "40000"
    assert stx.reply_flow == Flow("udp", "198.51.100.99", 40000)


async def test_an_invite_gets_100_trying_at_once(h: Harness) -> None:
    h.server.on_message(request_bytes("INVITE", BOB), PHONE)
    assert h.sender.statuses() == [100]  # before the router has even run
    assert h.router.routed == []
    await settle()
    assert len(h.router.routed) == 1
    assert h.sender.statuses() == [100]


async def test_a_retransmitted_register_is_absorbed(h: Harness) -> None:
    h.registrar.gate = asyncio.Event()
    data = request_bytes("REGISTER", "sip:example.com", call_id="r")
    await h.receive(data)
    await h.receive(data)  # retransmitted while the registrar works
    assert h.sender.sent == []
    h.registrar.gate.set()
    await settle()
    assert h.sender.statuses() == [200]
    await h.receive(data)  # retransmitted after the answer: the same answer again
    assert h.sender.statuses() == [200, 200]
    assert h.sender.sent[0] == h.sender.sent[1]
    assert len(h.registrar.handled) == 1


@pytest.mark.parametrize(
    ("method", "error", "status", "reason", "header"),
    [
        ("INVITE", LocationUnavailable("no node answered"), 503,
         "Location Service Unavailable", ("Retry-After", "5")),
        ("INVITE", NotFound("nobody"), 404, "Not Found", None),
        ("REGISTER", IntervalTooBrief(60), 423, "Interval Too Brief", ("Min-Expires", "60")),
    ],
)  # fmt: skip
async def test_a_handlers_error_is_its_response_once(
    h: Harness,
    method: str,
    error: SipError,
    status: int,
    reason: str,
    header: tuple[str, str] | None,
) -> None:
    h.router.error = h.registrar.error = error
    data = request_bytes(method, BOB if method == "INVITE" else "sip:example.com")
    await h.receive(data)
    finals = [r for r in h.responses() if r.status >= 200]
    assert [(r.status, r.reason) for r in finals] == [(status, reason)]
    if header is not None:
        assert finals[0].headers.get(header[0]) == header[1]
    assert finals[0].to.tag  # a final response from us carries our To tag
    await h.receive(data)  # a retransmission gets the same answer, from the transaction
    assert [r.status for r in h.responses() if r.status >= 200] == [status, status]
    assert len(h.router.routed) + len(h.registrar.handled) == 1


async def test_an_ack_for_our_error_response_is_absorbed(h: Harness) -> None:
    h.router.error = NotFound("nobody")
    await h.receive(request_bytes("INVITE", BOB))
    ack = request_bytes("ACK", BOB).replace(
        b"To: <sip:bob@example.com>", f"To: {h.responses()[-1].headers.get('To')}".encode()
    )
    await h.receive(ack)
    assert h.router.acks == []


async def test_the_real_registrar_refusing_a_record_is_answered_403(h: Harness) -> None:
    # The registrar raises; the server answers, once, with the error's reason.
    clock = ManualClock()
    publisher = FakePublisher()
    publisher.refuse = TooManyBindings("sip:alice@example.com: 40 bindings do not fit")
    store = MemoryStore()
    users = FakeUsers()
    registrar = RegistrarService(
        RegistrarConfig(domains=("example.com",)), identity=ME,
        directory=LocalDirectory(store, users, clock), transactions=h.transactions,
        auth=AuthGate(users, "example.com", b"s" * 32, transactions=h.transactions,
                      counters=h.counters, clock=clock),
        publisher=publisher, counters=h.counters, clock=clock,
    )  # fmt: skip
    server = build(h.sender, h.transactions, h.counters, registrar, h.router)
    try:
        server.on_message(
            request_bytes("REGISTER", "sip:example.com", from_="sip:alice@example.com",
                          to="sip:alice@example.com"),
            PHONE,
        )  # fmt: skip
        await settle()
    finally:
        await server.close()
    assert [(r.status, r.reason) for r in h.responses()] == [(403, "Too Many Bindings")]
    assert await store.load("sip:alice@example.com", clock()) == []


# --- CANCEL ------------------------------------------------------------------------------------


async def test_cancel_of_a_pending_invite_is_answered_and_cancels_the_branches(
    h: Harness,
) -> None:
    cancelled: list[bool] = []
    h.router.on_cancel = lambda: cancelled.append(True)
    invite = request_bytes("INVITE", BOB)
    await h.receive(invite)
    await h.receive(cancel_for(invite))
    assert cancelled == [True]
    [(_, trying), (_, ok)] = h.sender.responses()
    assert (trying.status, ok.status, ok.cseq.method) == (100, 200, "CANCEL")


async def test_cancel_of_an_invite_nobody_forwarded_answers_it_487(h: Harness) -> None:
    invite = request_bytes("INVITE", BOB)
    await h.receive(invite)
    await h.receive(cancel_for(invite))
    answers = [(r.status, r.cseq.method) for r in h.responses()]
    assert answers == [(100, "INVITE"), (200, "CANCEL"), (487, "INVITE")]
    _, ok, terminated = h.responses()
    assert ok.to.tag == terminated.to.tag  # §9.2: the 200 to CANCEL has the INVITE's tag


async def test_cancel_without_an_invite_gets_481(h: Harness) -> None:
    await h.receive(cancel_for(request_bytes("INVITE", BOB)))
    assert [(r.status, r.cseq.method) for r in h.responses()] == [(481, "CANCEL")]


async def test_a_retransmitted_cancel_is_absorbed(h: Harness) -> None:
    invite = request_bytes("INVITE", BOB)
    await h.receive(invite)
    await h.receive(cancel_for(invite))
    await h.receive(cancel_for(invite))
    answers = [(r.status, r.cseq.method) for r in h.responses()]
    assert answers == [(100, "INVITE"), (200, "CANCEL"), (487, "INVITE"), (200, "CANCEL")]


# --- responses ---------------------------------------------------------------------------------


async def test_a_response_goes_to_its_client_transaction(h: Harness) -> None:
    branch_request = parse_message(
        request_bytes("OPTIONS", "sip:bob@192.0.2.20:5070",
                      vias=["SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-out-1", PHONE_VIA])
    )  # fmt: skip
    assert isinstance(branch_request, Request)
    got: list[Response] = []
    h.transactions.start_client(
        branch_request, Flow("udp", "192.0.2.20", 5070), got.append, lambda: None
    )
    reply = make_response(branch_request, 200, to_tag="b0b")
    await h.receive(reply.to_bytes(), Flow("udp", "192.0.2.20", 5070))
    assert [r.status for r in got] == [200]
    assert h.router.strays == []


async def test_a_response_no_transaction_wants_goes_to_the_router(h: Harness) -> None:
    stray = make_response(
        parse_message(
            request_bytes("INVITE", BOB,
                          vias=["SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-gone", PHONE_VIA])
        ),  # type: ignore[arg-type]
        200, to_tag="b0b",
    )  # fmt: skip
    await h.receive(stray.to_bytes(), Flow("udp", "192.0.2.20", 5070))
    assert [r.status for r in h.router.strays] == [200]


# --- counters ------------------------------------------------------------------------------------


async def test_counters_count_requests_and_responses(h: Harness) -> None:
    await h.receive(request_bytes("INVITE", BOB, call_id="i", vias=[via("i")]))
    await h.receive(request_bytes("REGISTER", "sip:example.com", call_id="r", vias=[via("r")]))
    await h.receive(request_bytes("REGISTER", "sip:example.com", call_id="r2", vias=[via("r2")]))
    stray = make_response(
        parse_message(
            request_bytes("INVITE", BOB,
                          vias=["SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-gone", PHONE_VIA])
        ),  # type: ignore[arg-type]
        486,
    )  # fmt: skip
    await h.receive(stray.to_bytes(), Flow("udp", "192.0.2.20", 5070))
    snapshot = h.counters.snapshot()
    assert snapshot["requests_received.INVITE"] == 1
    assert snapshot["requests_received.REGISTER"] == 2
    assert snapshot["responses_received.4xx"] == 1
    assert snapshot["responses_sent.1xx"] == 1
    assert snapshot["responses_sent.2xx"] == 2


# --- shutting down -----------------------------------------------------------------------------


async def test_draining_refuses_new_calls_and_cancels_ringing_ones(h: Harness) -> None:
    cancelled: list[bool] = []
    h.router.on_cancel = lambda: cancelled.append(True)
    await h.receive(request_bytes("INVITE", BOB, call_id="ringing", vias=[via("ringing")]))
    assert h.server.drain() == 1
    assert cancelled == [True]
    await h.receive(request_bytes("INVITE", BOB, call_id="new", vias=[via("new")]))
    await h.receive(request_bytes("REGISTER", "sip:example.com", call_id="r", vias=[via("r")]))
    refused = [r for r in h.responses() if r.call_id in ("new", "r")]
    assert [(r.status, r.headers.get("Retry-After")) for r in refused] == [(503, "5")] * 2
    # A dialog goes on: its BYE still reaches the router.
    await h.receive(request_bytes("BYE", BOB, call_id="d", to_tag="b0b", vias=[via("d")]))
    assert [s.request.call_id for s in h.router.routed] == ["ringing", "d"]
    assert h.registrar.handled == []

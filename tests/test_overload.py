"""Overload control: the decision on a manual clock (proxy.overload), the 503 built from raw
bytes (proxy.sip.shed), and the transport answering it before anything is parsed."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.overload import OverloadControl
from proxy.sip.message import Response, parse_message, validate_response
from proxy.sip.shed import Verdict, shed
from proxy.stats import SipCounters
from proxy.transport import SO_TIMESTAMPNS, TransportLayer

HOST = "127.0.0.1"


def request(
    method: str = "INVITE",
    *,
    to_params: str = "",
    extra: str = "",
    compact: bool = False,
    cseq_method: str | None = None,
) -> bytes:
    branch = "z9hG4bK" + uuid.uuid4().hex[:12]
    names = ("v", "f", "t", "i") if compact else ("Via", "From", "To", "Call-ID")
    return (
        f"{method} sip:bob@example.com SIP/2.0\r\n"
        f"{names[0]}: SIP/2.0/UDP 192.0.2.10:5060;branch={branch};rport\r\n"
        f"{names[0]}: SIP/2.0/UDP 192.0.2.99:5070;branch=z9hG4bKfirst\r\n"
        "Max-Forwards: 70\r\n"
        f'{names[1]}: "Alice" <sip:alice@example.com>;tag=a1b2\r\n'
        f"{names[2]}: <sip:bob@example.com>{to_params}\r\n"
        f"{names[3]}: {uuid.uuid4().hex}@192.0.2.10\r\n"
        f"CSeq: 7 {cseq_method or method}\r\n"
        f"{extra}"
        "Contact: <sip:alice@192.0.2.10:5060>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


# --- proxy.sip.shed -------------------------------------------------------------------


def test_a_new_invite_gets_a_503_echoing_the_five_headers_with_a_to_tag() -> None:
    data = request()
    out = shed(data, retry_after=7)
    assert isinstance(out, bytes)
    resp = parse_message(out)
    req = parse_message(data)
    assert isinstance(resp, Response)
    validate_response(resp)
    assert (resp.status, resp.reason) == (503, "Service Unavailable")
    assert resp.headers.get("Retry-After") == "7"
    # §8.2.6.2: Via (all of them, in order), From, Call-ID and CSeq copied; To with a tag.
    assert resp.headers.get_all("Via") == req.headers.get_all("Via")
    assert resp.headers.get("From") == req.headers.get("From")
    assert resp.call_id == req.call_id
    assert resp.cseq == req.cseq
    assert resp.to.uri == req.to.uri and resp.to.tag
    assert resp.headers.get("Contact") is None and resp.body == b""


def test_the_to_tag_is_the_same_for_a_retransmission_and_differs_between_requests() -> None:
    # §8.2.7: a stateless UAS must give the same request the same tag.
    data = request()
    first, again = shed(data, 5), shed(data, 5)
    other = shed(request(), 5)
    assert isinstance(first, bytes) and isinstance(again, bytes) and isinstance(other, bytes)
    tag = parse_message(first).to.tag
    assert parse_message(again).to.tag == tag
    assert parse_message(other).to.tag != tag


@pytest.mark.parametrize("method", ["INVITE", "REGISTER", "OPTIONS", "SUBSCRIBE", "MESSAGE"])
def test_every_out_of_dialog_method_but_ack_and_cancel_is_shed(method: str) -> None:
    assert isinstance(shed(request(method), 5), bytes)


@pytest.mark.parametrize("method", ["ACK", "CANCEL"])
def test_ack_and_cancel_pass(method: str) -> None:
    assert shed(request(method), 5) is Verdict.PASS


@pytest.mark.parametrize(
    "to_params", [";tag=b0b", ";TAG=b0b", " ; tag = b0b", ";x=1;tag=b0b"], ids=repr
)
def test_in_dialog_requests_pass(to_params: str) -> None:
    for method in ("BYE", "INVITE", "INFO", "UPDATE"):  # re-INVITE included
        assert shed(request(method, to_params=to_params), 5) is Verdict.PASS


def test_a_tag_inside_the_to_uri_is_not_a_to_tag() -> None:
    data = request().replace(b"To: <sip:bob@example.com>", b"To: <sip:bob@example.com;tag=x>")
    assert isinstance(shed(data, 5), bytes)


def test_compact_forms_and_folded_lines_are_copied() -> None:
    data = request(compact=True).replace(b"i: ", b"i:\r\n  ")
    out = shed(data, 5)
    assert isinstance(out, bytes)
    resp = parse_message(out)
    assert resp.call_id == parse_message(data).call_id
    assert len(resp.headers.get_all("Via")) == 2 and resp.to.tag


def test_a_response_passes() -> None:
    assert shed(b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n", 5) is Verdict.PASS


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01garbage",
        b"INVITE sip:bob@example.com\r\n\r\n",  # no SIP-Version
        request().replace(b"Call-ID:", b"X-Call:"),  # a header to copy is missing
        request().replace(b"CSeq: 7 INVITE\r\n", b"CSeq: 7 INVITE\r\nCSeq: 8 INVITE\r\n"),
        request().replace(b"Max-Forwards: 70", b"Max-Forwards 70"),  # no colon
        request().replace(b"\r\n\r\n", b"\r\n"),  # no end of the header block
    ],
    ids=range(7),
)
def test_what_cannot_be_read_is_dropped(data: bytes) -> None:
    assert shed(data, 5) is Verdict.DROP


@given(st.binary(max_size=600))
def test_any_bytes_give_a_verdict_or_a_503(data: bytes) -> None:
    out = shed(data, 5)
    assert isinstance(out, bytes | Verdict)


def test_answering_costs_less_than_the_request_size_bound() -> None:
    data = request(extra="Subject: " + "x" * 1000 + "\r\n")
    out = shed(data, 5)
    assert isinstance(out, bytes) and len(out) < len(data)


# --- proxy.overload on a manual clock -----------------------------------------------------


class InFlight:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        return self.n


def control(
    max_queue_delay: float = 0.2, max_transactions: int = 100
) -> tuple[OverloadControl, InFlight]:
    txs = InFlight()
    ov = OverloadControl(max_queue_delay, max_transactions, txs, smoothing=1.0, hold=5.0)
    return ov, txs


def test_not_shedding_when_the_queue_is_short_and_few_transactions_run() -> None:
    ov, txs = control()
    txs.n = 99
    ov.observe(0.19)
    assert not ov.shedding(0.0)
    assert not ov.overloaded


def test_queue_delay_past_the_limit_sheds_until_it_falls_below_half() -> None:
    ov, _ = control()
    ov.observe(0.25)
    assert ov.shedding(0.0)
    ov.observe(0.15)  # under the limit, not yet under half of it: hysteresis
    assert ov.shedding(0.1)
    ov.observe(0.09)
    assert not ov.shedding(0.2)


def test_transactions_in_flight_at_the_limit_shed_until_nine_tenths() -> None:
    ov, txs = control()
    txs.n = 100
    assert ov.shedding(0.0)
    txs.n = 95
    assert ov.shedding(0.1)
    txs.n = 89
    assert not ov.shedding(0.2)


def test_the_delay_is_an_ewma_of_the_samples() -> None:
    ov = OverloadControl(0.2, 100, lambda: 0, smoothing=0.5)
    ov.observe(0.4)
    assert ov.delay == pytest.approx(0.2)
    ov.observe(0.4)
    assert ov.delay == pytest.approx(0.3)
    ov.observe(-1.0)  # a clock step backwards counts as no delay
    assert ov.delay == pytest.approx(0.15)


def test_a_tick_without_samples_means_an_empty_queue() -> None:
    ov, _ = control()
    ov.observe(1.0)
    ov.tick(1.0)  # a sample since the last tick: kept
    assert ov.delay == 1.0
    ov.tick(2.0)
    assert ov.delay == 0.0 and not ov.shedding(2.0)


def test_an_episode_is_logged_once_at_its_start_and_once_at_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ov, _ = control()
    with caplog.at_level(logging.WARNING, logger="proxy.overload"):
        now = 0.0
        for _ in range(50):  # the decision flips many times; the episode goes on
            ov.observe(0.3)
            assert ov.shedding(now)
            ov.shed(now)
            ov.observe(0.0)
            assert not ov.shedding(now + 0.05)
            now += 0.1
        assert ov.overloaded
        ov.tick(now + 4.0)
        assert ov.overloaded  # not 5 s without a 503 yet
        ov.observe(0.0)
        ov.tick(now + 5.0)
        assert not ov.overloaded
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("overload: answering new requests 503 (queue delay 300 ms")
    assert lines[1].startswith("overload over after 4.9 s: 50 request(s) answered 503")
    assert ov.rejected == 50 and ov.episodes == 1


# --- the transport sheds before parsing -----------------------------------------------------


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.queue.put_nowait(data)


@pytest.fixture
async def overloaded() -> AsyncIterator[tuple[TransportLayer, list[bytes], InFlight, int]]:
    delivered: list[bytes] = []
    txs = InFlight()
    txs.n = 10_000
    counters = SipCounters()
    layer = TransportLayer(
        lambda data, flow: delivered.append(data),
        overload=OverloadControl(0.2, 100, txs, retry_after=9),
        counters=counters,
    )
    port = await layer.start(HOST, 0)
    yield layer, delivered, txs, port
    await layer.close()


async def test_new_requests_get_503_and_in_dialog_ones_and_responses_go_through(
    overloaded: tuple[TransportLayer, list[bytes], InFlight, int],
) -> None:
    layer, delivered, _, port = overloaded
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(Peer, local_addr=(HOST, 0))
    try:
        invite = request("INVITE")
        transport.sendto(invite, (HOST, port))
        answer = await asyncio.wait_for(peer.queue.get(), 2.0)
        resp = parse_message(answer)
        assert isinstance(resp, Response) and resp.status == 503
        assert resp.headers.get("Retry-After") == "9"
        assert resp.call_id == parse_message(invite).call_id
        passing = [
            request("BYE", to_params=";tag=b0b"),
            request("INVITE", to_params=";tag=b0b"),  # re-INVITE
            request("ACK", to_params=";tag=b0b"),
            request("CANCEL"),
            b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx\r\n\r\n",
        ]
        for data in passing:
            transport.sendto(data, (HOST, port))
        for _ in range(50):
            if len(delivered) == len(passing):
                break
            await asyncio.sleep(0.02)
        assert delivered == passing
        assert peer.queue.empty()  # nothing answered them here
        assert layer.counters.overload_rejected == 1
        assert layer.counters.responses_sent["5xx"] == 1
    finally:
        transport.close()


async def test_over_tcp_the_503_comes_back_on_the_connection(
    overloaded: tuple[TransportLayer, list[bytes], InFlight, int],
) -> None:
    _, delivered, txs, port = overloaded
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request("REGISTER").replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        assert head.startswith(b"SIP/2.0 503 Service Unavailable\r\n")
        txs.n = 0  # the transactions finish: requests are served again
        served = request("REGISTER").replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
        writer.write(served)
        for _ in range(50):
            if delivered:
                break
            await asyncio.sleep(0.02)
        assert delivered == [served]
    finally:
        writer.close()


def test_the_kernel_receive_timestamp_is_available() -> None:
    # The queue delay rests on SO_TIMESTAMPNS; if a platform lacks it the proxy still
    # works (transactions in flight remain a signal), but on Linux it must be there.
    if SO_TIMESTAMPNS is None:
        pytest.skip("not Linux")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        assert sock.getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS) == 1


async def test_queue_delay_is_measured_from_kernel_timestamps() -> None:
    # Datagrams that wait in the socket while the loop is busy show that wait as delay.
    ov = OverloadControl(10.0, 100, lambda: 0, smoothing=1.0)
    layer = TransportLayer(lambda data, flow: None, overload=ov)
    port = await layer.start(HOST, 0)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(request("OPTIONS"), (HOST, port))
            time.sleep(0.3)  # the loop is blocked: the datagram waits in the queue
            for _ in range(50):
                await asyncio.sleep(0.01)
                if ov.delay:
                    break
        assert 0.25 <= ov.delay < 1.0
    finally:
        await layer.close()


async def test_a_shed_udp_request_is_answered_at_its_source_not_at_its_via(
    overloaded: tuple[TransportLayer, list[bytes], InFlight, int],
) -> None:
    # The 503 goes where the datagram came from (as with rport), never to a host the Via
    # names: shedding cannot be used to reflect traffic at someone else.
    _, _, _, port = overloaded
    loop = asyncio.get_running_loop()
    source, peer = await loop.create_datagram_endpoint(Peer, local_addr=(HOST, 0))
    target, victim = await loop.create_datagram_endpoint(Peer, local_addr=(HOST, 0))
    try:
        victim_port = target.get_extra_info("sockname")[1]
        data = (
            request("INVITE")
            .replace(b"192.0.2.10:5060;branch", f"{HOST}:{victim_port};branch".encode())
            .replace(b";rport", b"")
        )
        source.sendto(data, (HOST, port))
        answer = await asyncio.wait_for(peer.queue.get(), 2.0)
        assert answer.startswith(b"SIP/2.0 503 ")
        await asyncio.sleep(0.1)
        assert victim.queue.empty()
    finally:
        source.close()
        target.close()

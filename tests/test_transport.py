"""The asyncio transports (RFC 3261 §18, RFC 5626 §3.5.1) and the server on top of them,
over real sockets on 127.0.0.1 and ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from proxy.config import Config, HostPort
from proxy.resolver import Resolver
from proxy.sip.framing import MAX_MESSAGE_BYTES
from proxy.sip.message import Request, Response, make_response, parse_message
from proxy.sip.uri import SipUri
from proxy.site import Site, build_site
from proxy.transport import Flow, TransportLayer

HOST = "127.0.0.1"
CORPUS = Path(__file__).resolve().parent / "data" / "rfc4475"
WAIT = 2.0  # upper bound for anything that should happen "at once"


def options(
    port: int, *, transport: str = "UDP", sent_by: str = "127.0.0.1:9", rport: bool = True
) -> bytes:
    branch = "z9hG4bK" + uuid.uuid4().hex[:12]
    return (
        f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {sent_by};branch={branch}{';rport' if rport else ''}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@{HOST}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{HOST}:{port}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class Inbox:
    """What a TransportLayer delivered: (data, flow) pairs, awaitable."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Flow]] = asyncio.Queue()

    def __call__(self, data: bytes, flow: Flow) -> None:
        self.queue.put_nowait((data, flow))

    async def get(self, timeout: float = WAIT) -> tuple[bytes, Flow]:
        return await asyncio.wait_for(self.queue.get(), timeout)


class UdpPeer(asyncio.DatagramProtocol):
    """A phone's UDP socket."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.queue.put_nowait(data)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (HOST, port))

    async def recv(self, timeout: float = WAIT) -> bytes:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def response_to(self, call_id: str, timeout: float = WAIT) -> Response:
        """The next response for ``call_id``, skipping anything else that arrives."""
        deadline = time.monotonic() + timeout
        while True:
            data = await self.recv(max(0.01, deadline - time.monotonic()))
            msg = parse_message(data)
            if isinstance(msg, Response) and msg.call_id == call_id:
                return msg


class Net:
    """The test's own sockets (phones), all closed at the end of the test."""

    def __init__(self) -> None:
        self.udp_peers: list[UdpPeer] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def udp(self) -> UdpPeer:
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(UdpPeer, local_addr=(HOST, 0))
        self.udp_peers.append(peer)
        return peer

    async def tcp(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(HOST, port)
        self.writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for peer in self.udp_peers:
            if peer.transport is not None:
                peer.transport.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await asyncio.sleep(0)  # let the transports' close callbacks run


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    n = Net()
    yield n
    await n.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the other side closes (or resets) the connection within ``timeout``."""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


Make = Callable[..., Awaitable[tuple[TransportLayer, Inbox, int]]]


@pytest.fixture
async def layer_factory() -> AsyncIterator[Make]:
    layers: list[TransportLayer] = []

    async def make(**kw: float) -> tuple[TransportLayer, Inbox, int]:
        inbox = Inbox()
        layer = TransportLayer(inbox, **kw)
        port = await layer.start(HOST, 0)
        layers.append(layer)
        return layer, inbox, port

    yield make
    for layer in layers:
        await layer.close()


# --- Flow ----------------------------------------------------------------------------------


def test_flow_text_round_trip() -> None:
    for flow in (Flow("udp", "192.0.2.1", 5060), Flow("tcp", "2001:db8::1", 5070)):
        assert Flow.parse(str(flow)) == flow
    assert str(Flow("tcp", "2001:db8::1", 5070)) == "tcp:[2001:db8::1]:5070"
    assert Flow("tcp", "h", 1).reliable and not Flow("udp", "h", 1).reliable
    for bad in ("sctp:1.2.3.4:5060", "udp:1.2.3.4", "udp::5060", "tcp:1.2.3.4:x"):
        with pytest.raises(ValueError):
            Flow.parse(bad)


# --- UDP and TCP on one port -------------------------------------------------------------


async def test_udp_and_tcp_listen_on_the_same_port(net: Net, layer_factory: Make) -> None:
    layer, inbox, port = await layer_factory()
    assert port != 0 and layer.port == port

    peer = await net.udp()
    msg = options(port)
    peer.send(msg, port)
    data, flow = await inbox.get()
    assert data == msg
    assert flow == Flow("udp", HOST, peer.port)

    _, writer = await net.tcp(port)
    msg = options(port, transport="TCP")
    writer.write(msg)
    data, flow = await inbox.get()
    assert data == msg
    assert flow.transport == "tcp" and flow.port == writer.get_extra_info("sockname")[1]
    assert peer.transport is not None
    peer.transport.close()


async def test_udp_datagram_is_delivered_whole(net: Net, layer_factory: Make) -> None:
    _, inbox, port = await layer_factory()
    peer = await net.udp()
    body = b"x" * 3000
    msg = options(port).replace(b"Content-Length: 0", b"Content-Length: 3000") + body
    peer.send(msg, port)
    data, _ = await inbox.get()
    assert data == msg


async def test_udp_crlf_keepalives_are_ignored(net: Net, layer_factory: Make) -> None:
    _, inbox, port = await layer_factory()
    peer = await net.udp()
    peer.send(b"\r\n\r\n", port)
    peer.send(b"\r\n", port)
    peer.send(options(port), port)
    data, _ = await inbox.get()
    assert data.startswith(b"OPTIONS")  # the keep-alives never reached the server
    assert inbox.queue.empty()


async def test_udp_send_reaches_the_peer(net: Net, layer_factory: Make) -> None:
    layer, _, _ = await layer_factory()
    peer = await net.udp()
    layer.send(Flow("udp", HOST, peer.port), b"SIP/2.0 200 OK\r\n\r\n")
    assert await peer.recv() == b"SIP/2.0 200 OK\r\n\r\n"


async def test_a_failing_handler_does_not_stop_the_transport(
    net: Net, layer_factory: Make, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[bytes] = []

    def handler(data: bytes, flow: Flow) -> None:
        seen.append(data)
        if len(seen) == 1:
            raise RuntimeError("boom")

    layer, _, port = await layer_factory()
    layer.on_message = handler
    peer = await net.udp()
    with caplog.at_level(logging.ERROR, logger="proxy.transport"):
        peer.send(b"first", port)
        peer.send(b"second", port)
        for _ in range(100):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
    assert seen == [b"first", b"second"]
    assert any("error handling a message" in r.getMessage() for r in caplog.records)


# --- TCP framing, keep-alives and timeouts -------------------------------------------------


async def test_tcp_messages_split_and_batched(net: Net, layer_factory: Make) -> None:
    _, inbox, port = await layer_factory()
    _, writer = await net.tcp(port)
    a, b, c = (options(port, transport="TCP") for _ in range(3))
    writer.write(a[:20])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(a[20:] + b + c[:-5])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(c[-5:])
    got = [(await inbox.get())[0] for _ in range(3)]
    assert got == [a, b, c]


async def test_tcp_ping_is_answered_with_a_pong(net: Net, layer_factory: Make) -> None:
    _, inbox, port = await layer_factory()
    reader, writer = await net.tcp(port)
    writer.write(b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"
    # The ping reached nobody but the transport, and the connection stays usable.
    msg = options(port, transport="TCP")
    writer.write(msg)
    assert (await inbox.get())[0] == msg


async def test_idle_tcp_connection_is_closed(net: Net, layer_factory: Make) -> None:
    _, _, port = await layer_factory(idle_timeout=0.2, partial_timeout=5.0)
    reader, _ = await net.tcp(port)
    started = time.monotonic()
    assert await closed_by_peer(reader, WAIT)
    assert 0.15 <= time.monotonic() - started < 1.5


async def test_pings_keep_a_tcp_connection_open(net: Net, layer_factory: Make) -> None:
    _, _, port = await layer_factory(idle_timeout=0.4, partial_timeout=5.0)
    reader, writer = await net.tcp(port)
    for _ in range(8):  # 0.8 s in all: twice the idle timeout
        await asyncio.sleep(0.1)
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"
    assert await closed_by_peer(reader, WAIT)  # and once they stop, it is closed


async def test_partial_message_is_closed_after_the_partial_timeout(
    net: Net, layer_factory: Make
) -> None:
    _, inbox, port = await layer_factory(idle_timeout=10.0, partial_timeout=0.2)
    reader, writer = await net.tcp(port)
    writer.write(options(port, transport="TCP")[:40])  # and then nothing
    started = time.monotonic()
    assert await closed_by_peer(reader, WAIT)
    assert time.monotonic() - started < 1.5  # long before the idle timeout
    assert inbox.queue.empty()


async def test_single_crlf_keepalive_is_not_a_partial_message(
    net: Net, layer_factory: Make
) -> None:
    # Some phones keep their NAT binding with a lone CRLF: that is an idle connection.
    _, inbox, port = await layer_factory(idle_timeout=10.0, partial_timeout=0.2)
    reader, writer = await net.tcp(port)
    writer.write(b"\r\n")
    assert not await closed_by_peer(reader, 0.6)
    msg = options(port, transport="TCP")
    writer.write(msg)
    assert (await inbox.get())[0] == msg


async def test_message_over_64_kib_closes_the_connection(net: Net, layer_factory: Make) -> None:
    _, inbox, port = await layer_factory()
    reader, writer = await net.tcp(port)
    big = MAX_MESSAGE_BYTES + 1000
    head = options(port, transport="TCP").replace(b"Content-Length: 0", b"Content-Length: %d" % big)
    writer.write(head + b"x" * 4096)
    assert await closed_by_peer(reader, WAIT)
    assert inbox.queue.empty()


async def test_endless_header_block_closes_the_connection(net: Net, layer_factory: Make) -> None:
    _, inbox, port = await layer_factory()
    reader, writer = await net.tcp(port)
    writer.write(b"OPTIONS sip:x SIP/2.0\r\n")
    try:
        for _ in range(40):  # 80 KiB of headers that never end
            writer.write(b"X-Filler: " + b"a" * 2036 + b"\r\n")
            await writer.drain()
    except ConnectionError:
        pass
    assert await closed_by_peer(reader, WAIT)
    assert inbox.queue.empty()


async def test_missing_content_length_on_tcp_closes_the_connection(
    net: Net, layer_factory: Make
) -> None:
    _, inbox, port = await layer_factory()
    reader, writer = await net.tcp(port)
    writer.write(options(port, transport="TCP").replace(b"Content-Length: 0\r\n", b""))
    assert await closed_by_peer(reader, WAIT)
    assert inbox.queue.empty()


# --- sending over TCP ------------------------------------------------------------------------


async def test_send_reuses_the_connection_the_peer_opened(net: Net, layer_factory: Make) -> None:
    layer, inbox, port = await layer_factory()
    reader, writer = await net.tcp(port)
    writer.write(options(port, transport="TCP"))
    _, flow = await inbox.get()
    assert layer.has_connection(flow.host, flow.port)
    layer.send(flow, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    layer.send(flow, b"second")
    expected = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\nsecond"
    assert await asyncio.wait_for(reader.readexactly(len(expected)), WAIT) == expected


async def test_send_opens_one_connection_and_reuses_it(layer_factory: Make) -> None:
    layer, _, _ = await layer_factory()
    accepted: list[asyncio.StreamReader] = []
    received = bytearray()
    got_all = asyncio.Event()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(reader)
        while chunk := await reader.read(65536):
            received.extend(chunk)
            if received.endswith(b"three"):
                got_all.set()
        writer.close()

    server = await asyncio.start_server(on_connect, HOST, 0)
    dest = Flow("tcp", HOST, server.sockets[0].getsockname()[1])
    try:
        layer.send(dest, b"one,")
        layer.send(dest, b"two,")  # while still connecting: queued, same connection
        for _ in range(200):
            if layer.has_connection(dest.host, dest.port):
                break
            await asyncio.sleep(0.01)
        assert layer.has_connection(dest.host, dest.port)
        layer.send(dest, b"three")
        await asyncio.wait_for(got_all.wait(), WAIT)
        assert bytes(received) == b"one,two,three"
        assert len(accepted) == 1
    finally:
        server.close()
        await layer.close()
        await server.wait_closed()


async def test_send_to_a_closed_port_is_dropped_quietly(layer_factory: Make) -> None:
    layer, _, _ = await layer_factory()
    server = await asyncio.start_server(lambda r, w: None, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    layer.send(Flow("tcp", HOST, port), b"hello")
    for _ in range(200):
        if not layer._connecting:
            break
        await asyncio.sleep(0.01)
    assert not layer._connecting and not layer._pending
    assert not layer.has_connection(HOST, port)


# --- end to end through SipServer -----------------------------------------------------------


class _Sink(asyncio.DatagramProtocol):
    pass


class Clock:
    """The site's wall clock: real time until a test sets ``fixed``."""

    def __init__(self) -> None:
        self.fixed: float | None = None

    def __call__(self) -> float:
        return time.time() if self.fixed is None else self.fixed


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def sip_server(tmp_path: Path, clock: Clock) -> AsyncIterator[tuple[Site, int]]:
    config = Config(
        sip_listen=HostPort(HOST, 0),
        dht_listen=HostPort(HOST, 0),
        data_dir=tmp_path / "data",
        domains=("example.com",),
        tcp_idle_timeout=5.0,
        tcp_partial_timeout=1.0,
    )
    # The torture messages name hosts all over the Internet: whatever the proxy forwards
    # goes to a local sink instead, so that no test ever sends beyond this machine.
    loop = asyncio.get_running_loop()
    sink, _ = await loop.create_datagram_endpoint(_Sink, local_addr=(HOST, 0))
    sink_flow = Flow("udp", HOST, sink.get_extra_info("sockname")[1])

    class SinkResolver(Resolver):
        async def resolve(self, uri: SipUri) -> Flow:
            return sink_flow

    site = await build_site(config, clock=clock, make_resolver=SinkResolver)
    await site.start()
    yield site, site.sip_port
    await site.close()
    sink.close()


async def test_options_to_the_server_gets_200_with_received_and_rport(
    net: Net,
    sip_server: tuple[Site, int],
) -> None:
    _, port = sip_server
    peer = await net.udp()
    # The phone thinks it is at 10.0.0.1:5060 (behind NAT); we see 127.0.0.1:<port>.
    msg = options(port, sent_by="10.0.0.1:5060")
    peer.send(msg, port)
    call_id = parse_message(msg).call_id
    resp = await peer.response_to(call_id)
    assert resp.status == 200
    top = resp.top_via
    assert top.received == HOST
    assert top.rport == str(peer.port)  # RFC 3581: the source port, and sent there
    assert top.host == "10.0.0.1"


async def test_rport_response_goes_to_the_source_port_not_sent_by(
    net: Net,
    sip_server: tuple[Site, int],
) -> None:
    # Without rport the response would go to 127.0.0.1:9 (the Via port): we only get it
    # because the server honours rport.
    _, port = sip_server
    peer = await net.udp()
    msg = options(port, sent_by=f"{HOST}:9")
    peer.send(msg, port)
    resp = await peer.response_to(parse_message(msg).call_id)
    assert resp.status == 200
    assert resp.top_via.rport == str(peer.port)
    assert resp.top_via.received == HOST  # added even though it equals sent-by


async def test_options_over_tcp_is_answered_on_the_same_connection(
    net: Net,
    sip_server: tuple[Site, int],
) -> None:
    _, port = sip_server
    reader, writer = await net.tcp(port)
    writer.write(options(port, transport="TCP", sent_by="10.0.0.1:5060", rport=False))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    resp = parse_message(head)
    assert isinstance(resp, Response) and resp.status == 200
    assert resp.top_via.received == HOST


async def test_malformed_request_gets_400_and_the_server_keeps_serving(
    net: Net,
    sip_server: tuple[Site, int],
) -> None:
    _, port = sip_server
    peer = await net.udp()
    bad = options(port).replace(b"CSeq: 1 OPTIONS", b"CSeq: x OPTIONS")
    peer.send(bad, port)
    resp = await peer.response_to(parse_message(bad).call_id)
    assert resp.status == 400
    good = options(port)
    peer.send(good, port)
    assert (await peer.response_to(parse_message(good).call_id)).status == 200


def register(port: int, contact: str, *, cseq: int, expires: str | None = "3600") -> bytes:
    return (
        "REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.com>;tag=reg1\r\n"
        "To: <sip:alice@example.com>\r\n"
        "Call-ID: reg-call@10.0.0.1\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        + (f"Contact: {contact}\r\n" if contact else "")
        + (f"Expires: {expires}\r\n" if expires is not None else "")
        + "Content-Length: 0\r\n\r\n"
    ).encode()


async def test_register_through_the_server_with_a_manual_clock(
    net: Net, sip_server: tuple[Site, int], clock: Clock
) -> None:
    server, port = sip_server
    now = [1000.0]
    clock.fixed = now[0]
    peer = await net.udp()
    contact = "<sip:alice@10.0.0.1:5060>"

    async def send(msg: bytes) -> Response:
        peer.send(msg, port)
        return await peer.response_to("reg-call@10.0.0.1")

    ok = await send(register(port, contact, cseq=1))
    assert ok.status == 200
    assert ok.headers.values("Contact") == ["<sip:alice@10.0.0.1:5060>;expires=3600"]
    (b,) = await server.store.load("sip:alice@example.com", now[0])
    assert b.expires_at == 4600.0  # 1000 + 3600, added once
    assert b.source == f"udp:{HOST}:{peer.port}"  # the flow it really came from

    now[0] += 600  # a query ten minutes later
    clock.fixed = now[0]
    ok = await send(register(port, "", cseq=2, expires=None))
    assert ok.headers.values("Contact") == ["<sip:alice@10.0.0.1:5060>;expires=3000"]

    brief = await send(register(port, contact, cseq=3, expires="10"))
    assert (brief.status, brief.headers.get("Min-Expires")) == (423, "60")

    stale = await send(register(port, contact, cseq=1))  # the binding holds CSeq 1
    assert stale.status == 500  # same Call-ID, CSeq not higher (§10.3 step 7)

    now[0] = 4600.0  # the binding has run out
    clock.fixed = now[0]
    ok = await send(register(port, "", cseq=4, expires=None))
    assert ok.status == 200 and ok.headers.values("Contact") == []


def _mutations(corpus: list[bytes], rnd: random.Random, count: int) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(count):
        data = bytearray(rnd.choice(corpus))
        for _ in range(rnd.randint(1, 8)):
            op = rnd.random()
            i = rnd.randrange(len(data)) if data else 0
            if op < 0.4 and data:
                data[i] = rnd.randrange(256)
            elif op < 0.7:
                data[i:i] = rnd.choice([b"\r\n", b":", b";", b",", b"<", b"\x00", b" ", b"%"])
            else:
                del data[i : i + rnd.randint(1, 20)]
        out.append(bytes(data))
    return out


async def test_server_survives_the_rfc4475_corpus_and_random_bytes(
    net: Net, sip_server: tuple[Site, int], caplog: pytest.LogCaptureFixture
) -> None:
    server, port = sip_server
    corpus = [p.read_bytes() for p in sorted(CORPUS.glob("*.dat"))]
    assert len(corpus) > 40
    rnd = random.Random(4475)
    junk = [rnd.randbytes(rnd.randint(0, 1500)) for _ in range(100)]
    inputs = corpus + _mutations(corpus, rnd, 300) + junk
    peer = await net.udp()
    with caplog.at_level(logging.ERROR):
        for i, data in enumerate(inputs):
            if len(data) <= 65000:
                peer.send(data, port)
            if i % 20 == 0:
                await asyncio.sleep(0.01)  # let the server keep up
        # The same over TCP, one connection per message (most break the framing).
        for data in corpus + junk[:20]:
            _, writer = await net.tcp(port)
            writer.write(data)
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.3)
        probe = options(port)
        peer.send(probe, port)
        resp = await peer.response_to(parse_message(probe).call_id, timeout=5.0)
    assert resp.status == 200
    # Nothing reached the catch-all handlers: every bad input was a ParseError/SipError.
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert crashes == [], [r.getMessage() for r in crashes[:5]]
    assert server.counters is not None


async def test_retransmitted_register_gets_the_same_final_response(
    net: Net, sip_server: tuple[Site, int]
) -> None:
    # §17.2.2: a retransmission of a completed non-INVITE request is answered from the
    # transaction, not processed again (which would refuse it: same Call-ID and CSeq).
    server, port = sip_server
    peer = await net.udp()
    msg = register(port, "<sip:alice@10.0.0.1:5060>", cseq=7)
    peer.send(msg, port)
    first = await peer.response_to("reg-call@10.0.0.1")
    peer.send(msg, port)
    again = await peer.response_to("reg-call@10.0.0.1")
    assert (first.status, again.status) == (200, 200)
    assert again.to.tag == first.to.tag
    assert bytes(again.to_bytes()) == bytes(first.to_bytes())
    assert server.counters.registers_ok == 1


async def test_response_after_the_tcp_connection_closed_goes_to_the_sent_by_port(
    net: Net, sip_server: tuple[Site, int]
) -> None:
    # RFC 3261 §18.2.2: the caller's connection is gone when the callee answers, so the
    # proxy connects to the Via's received address and sent-by port, where the caller
    # listens, not to the closed connection's ephemeral port.
    _, port = sip_server
    callee = await net.udp()  # behind NAT: its Contact names another address
    callee.send(register(port, "<sip:alice@10.0.0.1:5060>", cseq=1), port)
    assert (await callee.response_to("reg-call@10.0.0.1")).status == 200

    arrived: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.put_nowait(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    listener = await asyncio.start_server(on_connect, HOST, 0)
    async with listener:
        listen_port = listener.sockets[0].getsockname()[1]
        call_id = uuid.uuid4().hex
        invite = (
            "INVITE sip:alice@example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP {HOST}:{listen_port};branch=z9hG4bK{uuid.uuid4().hex[:12]}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:bob@example.com>;tag=b1\r\n"
            f"To: <sip:alice@example.com>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:bob@{HOST}:{listen_port};transport=tcp>\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        reader, writer = await net.tcp(port)
        writer.write(invite)
        trying = parse_message(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT))
        assert isinstance(trying, Response) and trying.status == 100
        writer.close()  # the caller's connection goes away
        await asyncio.sleep(0.1)

        forwarded = parse_message(await callee.recv())
        assert isinstance(forwarded, Request) and forwarded.method == "INVITE"
        busy = make_response(forwarded, 486, to_tag="callee1")
        callee.send(busy.to_bytes(), port)
        head = parse_message(await asyncio.wait_for(arrived.get(), WAIT))
        assert isinstance(head, Response) and (head.status, head.call_id) == (486, call_id)

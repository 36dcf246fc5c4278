"""asyncio UDP and TCP transports on one host:port (RFC 3261 §18): the only place with sockets.

Incoming bytes become ``on_message(data, flow)`` calls, one per datagram or per framed
stream message. ``send(flow, data)`` goes out over UDP, or over the open TCP connection
to that peer, connecting first when there is none.

Before anything is parsed, every message passes two guards (both sans-IO, both
optional):

* the flood guard (``proxy.flood``): a source over its rate is blocked, and what it
  sends is dropped with no answer;
* overload control (``proxy.overload``): while the proxy cannot keep up, a new
  out-of-dialog request is answered 503 from its raw bytes (``proxy.sip.shed``).

UDP is read by a reader of our own on ``loop.add_reader`` rather than asyncio's datagram
transport: each wake-up drains up to ``UDP_BUDGET`` datagrams (asyncio reads one per
wake-up) with ``recvmsg_into`` into one reused buffer, so a datagram from a blocked
source costs one system call and one dictionary lookup and is never copied; and each
datagram's kernel receive time (``SO_TIMESTAMPNS``) tells how long it waited in the
socket's queue, which is the overload signal. bench/udp_receive.py measures both.

TCP connections are capped per remote address and in total (kept under the process's
file descriptor limit); a connection over a cap is reset at once. A connection that has
sent nothing yet, or stopped half-way through a message, gets the short partial
timeout. Running out of descriptors or memory is logged once per interval with a count
(:func:`install_resource_guard`), never as a traceback per event.

TLS connections (RFC 3261 §26.2.1) are TCP connections with TLS on top: the same class,
framing, timeouts and caps. An accepted one is counted against the caps before its
handshake (``loop.start_tls``), which must end within the partial timeout; one we open
is checked (its certificate, :mod:`proxy.tls`) before anything is written to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from .flood import FloodGuard
from .overload import OverloadControl
from .sip.errors import ParseError
from .sip.framing import MAX_MESSAGE_BYTES, Frame, Ping, StreamFramer
from .sip.shed import Verdict, shed
from .stats import SipCounters
from .stun import answer, looks_like_stun
from .tls import HANDSHAKE_TIMEOUT, SITE_SNI, Peer, PeerRefused, TlsEndpoint

log = logging.getLogger(__name__)

UDP_BUDGET = 64  # datagrams read per wake-up before other callbacks get their turn
UDP_RCVBUF = 4 * 1024 * 1024
# Linux's SO_TIMESTAMPNS (asm-generic; Python 3.11 does not name it): a struct timespec
# of the datagram's arrival (CLOCK_REALTIME) comes with each one as ancillary data.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35) if sys.platform == "linux" else None
_TIMESPEC = struct.Struct("@qq")
_ANC_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
# Connections the kernel completes before we accept them (asyncio's default is 100): a
# burst of phones reconnecting after an outage must not see resets or SYN retries.
TCP_BACKLOG = 1024
FD_RESERVE = 256  # descriptors kept free for everything that is not a SIP connection
HOUSEKEEPING = 1.0  # seconds between sweeps of the guards' tables and counter updates
LOG_INTERVAL = 60.0  # refused connections and exhausted resources: one line per interval
# What running out of descriptors, buffers or memory looks like (accept, connect, send).
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True, slots=True)
class Flow:
    """Where a message came from or goes to: transport and remote address."""

    transport: str  # "udp", "tcp" or "tls"
    host: str
    port: int

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Flow:
        transport, _, rest = text.partition(":")
        host, _, port = rest.rpartition(":")
        if transport not in ("udp", "tcp", "tls") or not host or not port.isdigit():
            raise ValueError(f"not a flow: {text!r}")
        return cls(transport, host.strip("[]"), int(port))


OnMessage = Callable[[bytes, Flow], None]


class FlowEvents(Protocol):
    """Who hears that a flow ended or showed it is alive (RFC 5626 outbound: the
    directory, which answers requests for a phone whose flow is gone with 430)."""

    def flow_closed(self, flow: Flow) -> None:
        """A TCP connection went away (either side closed it, or it timed out)."""

    def flow_heard(self, flow: Flow) -> None:
        """A keep-alive (CRLF or STUN) arrived over UDP from ``flow``."""


class SiblingFlows(Protocol):
    """The other worker processes of the site (``proxy.siblings``, ``--workers``): a TCP
    or TLS connection lives in the worker that accepted it, and the others hand it what
    they have to send over it."""

    def holds(self, host: str, port: int) -> bool:
        """Does another worker hold a usable connection with ``host:port``?"""

    def send(self, flow: Flow, data: bytes) -> bool:
        """Hand ``data`` to the worker holding ``flow``; False if none does."""


class IntervalLog:
    """Counts events of one kind and logs them at most once per interval: the first at
    once, the rest as one line with their count when the interval is over."""

    def __init__(self, what: str, interval: float = LOG_INTERVAL) -> None:
        self.what = what
        self.interval = interval
        self.count = 0  # since the start
        self._unlogged = 0
        self._detail = ""
        self._last: float | None = None

    def note(self, now: float, detail: str) -> None:
        self.count += 1
        self._unlogged += 1
        self._detail = detail
        if self._last is None or now - self._last >= self.interval:
            self.flush(now)

    def flush(self, now: float) -> None:
        """Log what was counted, if anything, unless the last line is too recent."""
        if not self._unlogged or (self._last is not None and now - self._last < self.interval):
            return
        since = "" if self._last is None else f" in the last {now - self._last:.0f} s"
        log.warning("%s: %d%s (last: %s)", self.what, self._unlogged, since, self._detail)
        self._unlogged = 0
        self._last = now


def is_exhaustion(exc: BaseException | None) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in EXHAUSTED)


def raise_fd_limit() -> int:
    """Raise the soft limit on open descriptors to the hard limit; returns the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.info("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
    return soft


def install_resource_guard(
    loop: asyncio.AbstractEventLoop, counters: SipCounters | None = None
) -> IntervalLog:
    """Raise the descriptor limit, and make the loop log running out of descriptors or
    memory once per interval with a count instead of a traceback per event (asyncio
    calls its exception handler on every failed accept(); the admin API's server too).
    Everything else goes to the handler that was there before."""
    raise_fd_limit()
    events = IntervalLog("out of file descriptors or memory")
    previous = loop.get_exception_handler()
    flushing: list[asyncio.TimerHandle] = []

    def flush() -> None:
        flushing.clear()
        events.flush(loop.time())

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not is_exhaustion(exc):
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        if counters is not None:
            counters.resources_exhausted += 1
        events.note(loop.time(), f"{context.get('message', 'error')}: {exc}")
        if not flushing:  # the count since the last line comes out within an interval
            flushing.append(loop.call_later(events.interval, flush))

    loop.set_exception_handler(handler)
    return events


class _UdpReader:
    """The UDP socket's reader: drains up to UDP_BUDGET datagrams per wake-up.

    The first datagram of a wake-up is read with ``recvmsg_into`` for its kernel receive
    time: it is the head of the queue, the one that waited longest, so its wait is the
    queue delay (one sample per wake-up is plenty: under load a wake-up reads many). The
    rest are read with ``recvfrom_into``, which builds no ancillary data (in a bare loop
    over a full socket, 1.7 µs a datagram against 2.2 µs with the timestamp, here). A
    datagram from a blocked source is never copied out of the reused buffer.
    """

    def __init__(self, layer: TransportLayer, sock: socket.socket) -> None:
        self.layer = layer
        self.sock = sock
        # 64 KiB holds any UDP payload (65,507 bytes over IPv4): nothing is truncated.
        self.buffer = bytearray(MAX_MESSAGE_BYTES)
        self.view = memoryview(self.buffer)
        self.ancillary = _ANC_SPACE if SO_TIMESTAMPNS is not None else 0
        self.loop = asyncio.get_running_loop()
        self.mapped = is_dual_stack(sock)  # IPv4 sources come as ::ffff:a.b.c.d

    def on_readable(self) -> None:
        layer = self.layer
        flood = layer.flood
        admit = flood.admit if flood is not None else None
        overload = layer.overload
        now = self.loop.time()
        try:
            size, anc, _flags, addr = self.sock.recvmsg_into([self.buffer], self.ancillary)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. an ICMP error queued on the socket
            log.debug("udp receive error: %s", exc)
            return
        if anc and overload is not None:
            sec, nsec = _TIMESPEC.unpack(anc[0][2])
            overload.observe(time.time() - sec - nsec * 1e-9)
        recv = self.sock.recvfrom_into
        buffer = self.buffer
        view = self.view
        budget = UDP_BUDGET
        mapped = self.mapped
        while True:
            host = addr[0]
            if mapped and host.startswith("::ffff:"):
                host = host[7:]
            if admit is None or admit(host, now):
                data = bytes(view[:size])
                if size and buffer[0] < 0x40:  # not a letter: no SIP start line
                    layer.keepalive(data, Flow("udp", host, addr[1]), now)
                else:
                    layer.receive(data, Flow("udp", host, addr[1]), now)
            # else blocked: nothing copied, nothing answered
            budget -= 1
            if budget <= 0:
                return  # the loop calls us again while datagrams wait
            try:
                size, addr = recv(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("udp receive error: %s", exc)
                return


class _TcpConnection(asyncio.Protocol):
    kind = "tcp"

    def __init__(self, layer: TransportLayer, *, inbound: bool) -> None:
        self.layer = layer
        self.inbound = inbound
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None
        self.counted = False  # in the layer's connection counts (not refused)
        self.framer_used = False  # any bytes received yet
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        self.flow = Flow(self.kind, unmapped(str(host)), int(port))
        layer = self.layer
        if self.inbound:
            refusal = layer.refuse_connection(self.flow.host)
            if refusal is not None:
                layer.refused(self.flow, refusal)
                transport.abort()  # a reset: the descriptor is free at once
                return
        layer.count_connection(self.flow.host, +1, inbound=self.inbound)
        self.counted = True
        layer.connections[(self.flow.host, self.flow.port)] = self
        # Until the first bytes come, an accepted connection is a partial message.
        first = min(layer.idle_timeout, layer.partial_timeout)
        self._arm(first if self.inbound else layer.idle_timeout)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        # Debug only: an idle flood times out thousands of these (counted instead).
        partial = bool(self.framer.pending) or (self.inbound and not self.framer_used)
        log.debug("closing %s: %s", self.flow, "partial message" if partial else "idle")
        if partial:
            self.layer.counters.tcp_partial_timeouts += 1
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None and self.flow is not None
        if not self.counted:
            return  # refused, being reset
        self.framer_used = True
        try:
            events = self.framer.feed(data)
        except ParseError as exc:
            log.info("closing %s: cannot frame stream: %s", self.flow, exc)
            self.transport.close()
            return
        layer = self.layer
        flood = layer.flood
        now = asyncio.get_running_loop().time()
        for event in events:
            if flood is not None and not flood.admit(self.flow.host, now):
                self.transport.abort()  # blocked: no answer, and no more reading
                return
            if isinstance(event, Ping):
                self.transport.write(b"\r\n")  # RFC 5626 §3.5.1 pong
            elif isinstance(event, Frame):
                layer.receive(event.data, self.flow, now)
        # A peer that stops half-way through a message gets a short timeout.
        self._arm(layer.partial_timeout if self.framer.pending else layer.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.flow is not None and self.counted:
            self.counted = False
            self.layer.count_connection(self.flow.host, -1, inbound=self.inbound)
            key = (self.flow.host, self.flow.port)
            if self.layer.connections.get(key) is self:
                del self.layer.connections[key]
            if self.layer.flow_events is not None:
                self.layer.flow_events.flow_closed(self.flow)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def usable(self) -> bool:
        """Open, and (TLS) past the handshake and the peer's check."""
        return self.transport is not None and not self.transport.is_closing()


class _TlsConnection(_TcpConnection):
    """SIP over TLS: a TCP connection (caps, framing, timeouts) that is upgraded first."""

    kind = "tls"

    def __init__(self, layer: TransportLayer, *, inbound: bool) -> None:
        super().__init__(layer, inbound=inbound)
        self.secured = False
        self.peer: Peer | None = None  # who a server we connected to is (proxy.tls)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.counted or self.flow is None:
            return  # refused over a cap: being reset
        assert isinstance(transport, asyncio.Transport)
        layer = self.layer
        if self.inbound:
            # A plain TCP connection so far, counted: the ClientHello waits in the socket.
            transport.pause_reading()
            layer.handshake(self._accept(transport))
            return
        # One we opened: asyncio finished the handshake before calling us.
        try:
            self.peer = layer.check_tls_peer(self.flow, transport)
        except PeerRefused as exc:
            layer.tls_refused(self.flow, str(exc))
            transport.abort()
            return
        self.secured = True

    async def _accept(self, raw: asyncio.Transport) -> None:
        layer = self.layer
        assert layer.tls is not None
        try:
            secured = await asyncio.get_running_loop().start_tls(
                raw, self, layer.tls.server, server_side=True,
                ssl_handshake_timeout=layer.partial_timeout,
            )  # fmt: skip
        except asyncio.CancelledError:
            self.connection_lost(None)
            raise
        except OSError as exc:  # ssl.SSLError, a reset, or the handshake timed out
            layer.tls_failed(self.flow, exc)
            self.connection_lost(exc)  # start_tls closed the socket
            return
        if secured is None or not self.counted:
            # Closed during the handshake (the partial timer): asyncio tells only us.
            self.connection_lost(None)
            return
        self.transport = secured
        self.secured = True

    def usable(self) -> bool:
        return self.secured and super().usable()


def is_dual_stack(sock: socket.socket) -> bool:
    """An IPv6 socket that also takes IPv4 (bound to ``::`` without IPV6_V6ONLY)."""
    if sock.family != socket.AF_INET6:
        return False
    return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


def unmapped(host: str) -> str:
    """``::ffff:a.b.c.d`` (IPv4 on a dual-stack socket) as the IPv4 address it is."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


async def _listen_stream(
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """A TCP listener; on ``::`` one dual-stack socket (asyncio would make it IPv6 only).
    ``sock``: a listening socket bound already (:func:`shared_listeners`)."""
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=TCP_BACKLOG)
    if host != "::":
        return await loop.create_server(
            factory, host, port, reuse_address=True, backlog=TCP_BACKLOG
        )
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return await loop.create_server(factory, sock=sock, backlog=TCP_BACKLOG)


def _reuseport(family: int, kind: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(TCP_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def shared_sockets(host: str, port: int, count: int) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` (UDP socket, TCP listener) pairs on one ``host:port`` (0: a port free on
    both), all with SO_REUSEPORT: one pair per worker process (``--workers``). The kernel
    spreads UDP datagrams over the sockets by source address and port, so each phone's
    stay with one worker, and spreads TCP connections as they come. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        for _attempt in range(20):
            udp = _reuseport(family, socket.SOCK_DGRAM, host, port)
            actual = int(udp.getsockname()[1])
            try:
                tcp = _reuseport(family, socket.SOCK_STREAM, host, actual)
            except OSError:
                udp.close()
                if port != 0:
                    raise
                continue  # the ephemeral UDP port is taken on TCP: try another
            pairs.append((udp, tcp))
            break
        else:
            raise OSError("could not find a port free on both UDP and TCP")
        while len(pairs) < count:
            udp = _reuseport(family, socket.SOCK_DGRAM, host, actual)
            try:
                tcp = _reuseport(family, socket.SOCK_STREAM, host, actual)
            except OSError:
                udp.close()
                raise
            pairs.append((udp, tcp))
    except OSError:
        for udp, tcp in pairs:
            udp.close()
            tcp.close()
        raise
    return pairs


def shared_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` TCP listeners on one ``host:port`` (0: any free port) with SO_REUSEPORT
    (SIP over TLS, one per worker). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            socks.append(_reuseport(family, socket.SOCK_STREAM, host, port))
            port = int(socks[0].getsockname()[1])
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class TransportLayer:
    def __init__(
        self,
        on_message: OnMessage | None = None,
        *,
        idle_timeout: float = 600.0,
        partial_timeout: float = 10.0,
        flood: FloodGuard | None = None,
        overload: OverloadControl | None = None,
        counters: SipCounters | None = None,
        max_tcp_per_address: int = 64,
        max_tcp_connections: int = 4096,
        flow_events: FlowEvents | None = None,
        siblings: SiblingFlows | None = None,
    ) -> None:
        """``on_message`` may come later, with :meth:`serve`: a site binds its sockets
        first, to know its port, and then builds what handles the messages.
        ``siblings``: the site's other worker processes, which may hold a connection."""
        self.on_message = on_message
        self.flow_events = flow_events
        self.siblings = siblings
        self.idle_timeout = idle_timeout
        self.partial_timeout = partial_timeout
        self.flood = flood
        self.overload = overload
        self.counters = counters if counters is not None else SipCounters()
        self.max_tcp_per_address = max_tcp_per_address
        self.max_tcp_connections = max_tcp_connections
        self.tcp_cap = max_tcp_connections  # lowered to fit the descriptor limit
        self.connections: dict[tuple[str, int], _TcpConnection] = {}
        self.tcp_total = 0  # live connections, both ways
        self._inbound: dict[str, int] = {}  # remote address -> accepted connections
        self._refusals = IntervalLog("refused TCP connections over the caps")
        self.tls: TlsEndpoint | None = None
        self.tls_port = 0
        self._tls_server: asyncio.Server | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._tls_refusals = IntervalLog("refused TLS peers")
        self._tls_failures = IntervalLog("failed TLS handshakes")
        self._connecting: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._udp: socket.socket | None = None
        self._udp_mapped = False
        self._tcp_server: asyncio.Server | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        self.host = ""
        self.port = 0

    def guard_resources(self) -> None:
        """For a process that runs a site: raise its descriptor limit and log running out
        of descriptors or memory once per interval (:func:`install_resource_guard`)."""
        install_resource_guard(asyncio.get_running_loop(), self.counters)
        self._fit_cap()

    def serve(self, on_message: OnMessage) -> None:
        """Hand every message from now on to ``on_message`` (earlier ones were dropped)."""
        self.on_message = on_message

    def receive(self, data: bytes, flow: Flow, now: float) -> None:
        """A message that passed the flood guard: shed it under overload, else deliver."""
        overload = self.overload
        if overload is not None and overload.shedding(now):
            verdict = shed(data, overload.retry_after)
            if verdict is Verdict.DROP:
                return
            if verdict is not Verdict.PASS:
                assert isinstance(verdict, bytes)
                overload.shed(now)
                self.counters.overload_rejected += 1
                self.counters.response(503, sent=True)
                self.send(flow, verdict)  # UDP: to the source address, as with rport
                return
        self.deliver(data, flow)

    def keepalive(self, data: bytes, flow: Flow, now: float) -> None:
        """A UDP datagram that cannot be SIP by its first byte: a keep-alive (RFC 5626
        §4.4.1: STUN, answered here; or CRLF, which some phones send), else whatever
        it is goes on to the parser as before."""
        if looks_like_stun(data):
            try:
                reply = answer(data, flow.host, flow.port)
            except ValueError as exc:  # StunError, or a source ipaddress cannot read
                log.debug("dropped a bad STUN message from %s: %s", flow, exc)
                return
            if reply is not None:
                self.send(flow, reply)
        elif data.strip(b"\r\n"):
            self.receive(data, flow, now)
            return
        if self.flow_events is not None:
            self.flow_events.flow_heard(flow)

    def deliver(self, data: bytes, flow: Flow) -> None:
        if self.on_message is None:
            log.debug("not serving yet: dropped a message from %s", flow)
            return
        try:
            self.on_message(data, flow)
        except Exception:  # the server must survive any one message
            log.exception("error handling a message from %s", flow)

    # --- TCP connection caps ---------------------------------------------------------------

    def refuse_connection(self, host: str) -> str | None:
        """Why a connection just accepted from ``host`` must be refused, or None."""
        now = asyncio.get_running_loop().time()
        if self.flood is not None and not self.flood.admit(host, now):
            return "source blocked for flooding"
        if self._inbound.get(host, 0) >= self.max_tcp_per_address:
            return f"{self.max_tcp_per_address} connections from {host} already"
        if self.tcp_total >= self.tcp_cap:
            return f"{self.tcp_cap} connections in all already"
        return None

    def refused(self, flow: Flow, reason: str) -> None:
        self.counters.tcp_refused += 1
        self._refusals.note(asyncio.get_running_loop().time(), f"{flow}: {reason}")

    def count_connection(self, host: str, delta: int, *, inbound: bool) -> None:
        self.tcp_total += delta
        if inbound:
            n = self._inbound.get(host, 0) + delta
            if n > 0:
                self._inbound[host] = n
            else:
                self._inbound.pop(host, None)

    def _fit_cap(self) -> None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        room = self.max_tcp_connections
        if soft != resource.RLIM_INFINITY:
            room = min(room, max(soft - FD_RESERVE, 16))
        if room != self.tcp_cap:
            if room < self.max_tcp_connections:
                log.info(
                    "TCP connections capped at %d (open file limit %d, %d kept in reserve)",
                    room, soft, FD_RESERVE,
                )  # fmt: skip
            self.tcp_cap = room

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(
        self,
        host: str,
        port: int,
        *,
        shared: tuple[socket.socket, socket.socket] | None = None,
    ) -> int:
        """Listen on UDP and TCP at the same host:port; returns the port (for port 0).
        ``shared``: a UDP socket and a TCP listener bound already (:func:`shared_sockets`:
        a worker process serves the pair the supervisor bound for it)."""
        if shared is not None:
            udp, listener = shared
            server = await _listen_stream(
                lambda: _TcpConnection(self, inbound=True), host, 0, listener
            )
            return self._adopt(host, udp, server)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _attempt in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.setblocking(False)
                if host == "::":
                    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                udp.bind((host, port))
            except OSError:
                udp.close()
                raise
            actual = int(udp.getsockname()[1])
            try:
                server = await _listen_stream(
                    lambda: _TcpConnection(self, inbound=True), host, actual
                )
            except OSError:
                udp.close()
                if port != 0:
                    raise
                continue  # the ephemeral UDP port is taken on TCP: try another
            return self._adopt(host, udp, server)
        raise OSError("could not find a port free on both UDP and TCP")

    def _adopt(self, host: str, udp: socket.socket, server: asyncio.Server) -> int:
        """Serve the bound UDP socket and the TCP server; returns the port."""
        loop = asyncio.get_running_loop()
        actual = int(udp.getsockname()[1])
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        if SO_TIMESTAMPNS is not None:
            udp.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._udp = udp
        self._udp_mapped = is_dual_stack(udp)
        loop.add_reader(udp.fileno(), _UdpReader(self, udp).on_readable)
        self._tcp_server = server
        self.host, self.port = host, actual
        if self.flood is not None:
            wildcard = host in ("0.0.0.0", "::")
            self.flood.exempt.update(("127.0.0.1", "::1") if wildcard else (host,))
        self._fit_cap()
        self._housekeeping = loop.call_later(HOUSEKEEPING, self._tick)
        return actual

    def _tick(self) -> None:
        """Once a second: sweep the guards' tables, publish their counters, log summaries."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        counters = self.counters
        if self.flood is not None:
            self.flood.tick(now)
            counters.flood_blocks = self.flood.blocks
            counters.flood_dropped = self.flood.dropped
            counters.flood_blocked = Counter(dict(self.flood.blocked_sources(now)))
        if self.overload is not None:
            self.overload.tick(now)
            counters.queue_delay_ms = round(self.overload.delay * 1000)
            counters.overloaded = int(self.overload.overloaded)
        counters.tcp_connections = self.tcp_total
        self._refusals.flush(now)
        self._tls_refusals.flush(now)
        self._tls_failures.flush(now)
        self._fit_cap()
        self._housekeeping = loop.call_later(HOUSEKEEPING, self._tick)

    def send(self, flow: Flow, data: bytes) -> None:
        if flow.transport == "udp":
            if self._udp is not None:
                host = flow.host
                if self._udp_mapped and ":" not in host:
                    host = "::ffff:" + host  # IPv4 from a dual-stack socket
                try:
                    self._udp.sendto(data, (host, flow.port))
                except BlockingIOError:
                    log.debug("udp send buffer full: dropped a message to %s", flow)
                except OSError as exc:
                    log.debug("udp send to %s failed: %s", flow, exc)
            return
        key = (flow.host, flow.port)
        conn = self.connections.get(key)
        if conn is not None and conn.kind == flow.transport and conn.usable():
            conn.write(data)
            return
        if self.siblings is not None and self.siblings.send(flow, data):
            return  # another worker of the site holds the connection
        self._pending.setdefault(key, []).append(data)
        if key not in self._connecting:
            self._connecting[key] = asyncio.get_running_loop().create_task(
                self._connect(key, flow.transport)
            )

    def has_connection(self, host: str, port: int) -> bool:
        """Is there a usable connection with ``host:port``, here or in another worker?"""
        conn = self.connections.get((host, port))
        if conn is not None and conn.usable():
            return True
        return self.siblings is not None and self.siblings.holds(host, port)

    def holds(self, flow: Flow) -> bool:
        """Does this process hold a usable connection for ``flow`` (TCP or TLS)?"""
        conn = self.connections.get((flow.host, flow.port))
        return conn is not None and conn.kind == flow.transport and conn.usable()

    def send_held(self, flow: Flow, data: bytes) -> bool:
        """Send over the connection this process holds for ``flow``, never connecting
        (another worker handed ``data`` over, for this connection only). False if none."""
        conn = self.connections.get((flow.host, flow.port))
        if conn is None or conn.kind != flow.transport or not conn.usable():
            return False
        conn.write(data)
        return True

    def _source_for(self, host: str) -> tuple[str, int] | None:
        """Connections we open leave from our listen address (the peer sees it, not the
        route's default source), when we listen on one address of that family."""
        if self.host in ("", "0.0.0.0", "::") or (":" in self.host) != (":" in host):
            return None
        return (self.host, 0)

    async def _connect(self, key: tuple[str, int], transport: str = "tcp") -> None:
        loop = asyncio.get_running_loop()
        source = self._source_for(key[0])
        try:
            if transport == "tls":
                if self.tls is None:
                    raise OSError("TLS is not set up")
                await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _TlsConnection(self, inbound=False), *key, ssl=self.tls.client,
                        server_hostname=SITE_SNI, ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                        local_addr=source,
                    ), HANDSHAKE_TIMEOUT + 5.0,
                )  # fmt: skip
            else:
                await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _TcpConnection(self, inbound=False), *key, local_addr=source
                    ),
                    5.0,
                )
        except (OSError, TimeoutError) as exc:
            if is_exhaustion(exc):
                self.counters.resources_exhausted += 1
            log.info("%s connect to %s:%s failed: %s", transport, key[0], key[1], exc)
            self._pending.pop(key, None)
            return
        finally:
            self._connecting.pop(key, None)
        conn = self.connections.get(key)
        for data in self._pending.pop(key, []):
            if conn is not None and conn.usable():
                conn.write(data)

    # --- TLS ---------------------------------------------------------------------------------

    async def listen_tls(
        self, host: str, port: int, endpoint: TlsEndpoint, sock: socket.socket | None = None
    ) -> int:
        """Listen for SIP over TLS at host:port (0: any free port), and open TLS
        connections with ``endpoint`` from now on. Returns the port. ``sock``: a
        listener bound already (:func:`shared_listeners`)."""
        self.tls = endpoint
        self._tls_server = await _listen_stream(
            lambda: _TlsConnection(self, inbound=True), host, port, sock
        )
        self.tls_port = int(self._tls_server.sockets[0].getsockname()[1])
        return self.tls_port

    def handshake(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def check_tls_peer(self, flow: Flow, transport: asyncio.Transport) -> Peer:
        """Who the TLS server at ``flow`` is; PeerRefused if its certificate will not do."""
        assert self.tls is not None
        obj = transport.get_extra_info("ssl_object")
        chain: list[bytes] = []
        if isinstance(obj, ssl.SSLObject):
            # Python 3.13 gives the whole chain; before, the leaf only.
            whole = getattr(obj, "get_unverified_chain", None)
            leaf = obj.getpeercert(binary_form=True)
            chain = list(whole()) if whole is not None else [leaf] if leaf else []
        return self.tls.check(flow.host, flow.port, chain)

    def forget_tls_peers(self, trusted: Callable[[str], bool]) -> int:
        """Close the connections to member sites whose key is no longer ``trusted`` (the
        trust folder changed): the next message connects, and is checked, afresh."""
        closed = 0
        for conn in list(self.connections.values()):
            peer = conn.peer if isinstance(conn, _TlsConnection) else None
            if peer is not None and peer.key_id is not None and not trusted(peer.key_id):
                if conn.transport is not None:
                    conn.transport.close()
                closed += 1
        if closed:
            log.warning("closed %d TLS connection(s) to sites whose key is no longer trusted",
                        closed)  # fmt: skip
        return closed

    def tls_refused(self, flow: Flow, reason: str) -> None:
        self._tls_refusals.note(asyncio.get_running_loop().time(), f"{flow}: {reason}")

    def tls_failed(self, flow: Flow | None, exc: BaseException) -> None:
        log.debug("TLS handshake with %s failed: %s", flow, exc)
        self._tls_failures.note(asyncio.get_running_loop().time(), f"{flow}: {exc}")

    async def close(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self._udp is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to undo
                asyncio.get_running_loop().remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None
        if self._tcp_server is not None:
            self._tcp_server.close()
        if self._tls_server is not None:
            self._tls_server.close()
        for task in list(self._handshakes):
            task.cancel()
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        for task in list(self._connecting.values()):
            task.cancel()
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()
        if self._tls_server is not None:
            await self._tls_server.wait_closed()
        await asyncio.gather(*self._handshakes, return_exceptions=True)

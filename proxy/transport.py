"""asyncio UDP and TCP transports on one host:port (RFC 3261 §18): the only place with sockets.

Incoming bytes become ``on_message(data, flow)`` calls, one per datagram or per framed
stream message. ``send(flow, data)`` goes out over UDP, or over the open TCP connection
to that peer, connecting first when there is none.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from .sip.errors import ParseError
from .sip.framing import Frame, Ping, StreamFramer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Flow:
    """Where a message came from or goes to: transport and remote address."""

    transport: str  # "udp" or "tcp"
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
        if transport not in ("udp", "tcp") or not host or not port.isdigit():
            raise ValueError(f"not a flow: {text!r}")
        return cls(transport, host.strip("[]"), int(port))


OnMessage = Callable[[bytes, Flow], None]


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, layer: TransportLayer) -> None:
        self.layer = layer

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if data in (b"\r\n\r\n", b"\r\n"):
            # RFC 5626 §4.4.1 keep-alive over UDP is STUN; plain CRLFs are just ignored.
            return
        self.layer.deliver(data, Flow("udp", str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)


class _TcpConnection(asyncio.Protocol):
    def __init__(self, layer: TransportLayer) -> None:
        self.layer = layer
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        self.flow = Flow("tcp", str(host), int(port))
        self.layer.connections[(self.flow.host, self.flow.port)] = self
        self._arm(self.layer.idle_timeout)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        log.info("closing %s: %s", self.flow, "partial message" if self.framer.pending else "idle")
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None and self.flow is not None
        try:
            events = self.framer.feed(data)
        except ParseError as exc:
            log.warning("closing %s: cannot frame stream: %s", self.flow, exc)
            self.transport.close()
            return
        for event in events:
            if isinstance(event, Ping):
                self.transport.write(b"\r\n")  # RFC 5626 §3.5.1 pong
            elif isinstance(event, Frame):
                self.layer.deliver(event.data, self.flow)
        # A peer that stops half-way through a message gets a short timeout.
        self._arm(self.layer.partial_timeout if self.framer.pending else self.layer.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.flow is not None:
            key = (self.flow.host, self.flow.port)
            if self.layer.connections.get(key) is self:
                del self.layer.connections[key]

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class TransportLayer:
    def __init__(
        self,
        on_message: OnMessage | None = None,
        *,
        idle_timeout: float = 600.0,
        partial_timeout: float = 10.0,
    ) -> None:
        """``on_message`` may come later, with :meth:`serve`: a site binds its sockets
        first, to know its port, and then builds what handles the messages."""
        self.on_message = on_message
        self.idle_timeout = idle_timeout
        self.partial_timeout = partial_timeout
        self.connections: dict[tuple[str, int], _TcpConnection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.Server | None = None
        self.host = ""
        self.port = 0

    def serve(self, on_message: OnMessage) -> None:
        """Hand every message from now on to ``on_message`` (earlier ones were dropped)."""
        self.on_message = on_message

    def deliver(self, data: bytes, flow: Flow) -> None:
        if self.on_message is None:
            log.debug("not serving yet: dropped a message from %s", flow)
            return
        try:
            self.on_message(data, flow)
        except Exception:  # the server must survive any one message
            log.exception("error handling a message from %s", flow)

    async def start(self, host: str, port: int) -> int:
        """Listen on UDP and TCP at the same host:port; returns the port (for port 0)."""
        loop = asyncio.get_running_loop()
        for _attempt in range(20):
            udp_transport, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(host, port)
            )
            actual = udp_transport.get_extra_info("sockname")[1]
            try:
                server = await loop.create_server(
                    lambda: _TcpConnection(self), host, actual, reuse_address=True
                )
            except OSError:
                udp_transport.close()
                if port != 0:
                    raise
                continue  # the ephemeral UDP port is taken on TCP: try another
            self._udp = udp_transport
            sock = udp_transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            self._tcp_server = server
            self.host, self.port = host, int(actual)
            return int(actual)
        raise OSError("could not find a port free on both UDP and TCP")

    def send(self, flow: Flow, data: bytes) -> None:
        if flow.transport == "udp":
            if self._udp is not None:
                self._udp.sendto(data, (flow.host, flow.port))
            return
        key = (flow.host, flow.port)
        conn = self.connections.get(key)
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.write(data)
            return
        self._pending.setdefault(key, []).append(data)
        if key not in self._connecting:
            self._connecting[key] = asyncio.get_running_loop().create_task(self._connect(key))

    def has_connection(self, host: str, port: int) -> bool:
        conn = self.connections.get((host, port))
        return conn is not None and conn.transport is not None and not conn.transport.is_closing()

    async def _connect(self, key: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: _TcpConnection(self), key[0], key[1]), 5.0
            )
        except (OSError, TimeoutError) as exc:
            log.info("tcp connect to %s:%s failed: %s", key[0], key[1], exc)
            self._pending.pop(key, None)
            return
        finally:
            self._connecting.pop(key, None)
        conn = self.connections.get(key)
        for data in self._pending.pop(key, []):
            if conn is not None:
                conn.write(data)

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        for task in list(self._connecting.values()):
            task.cancel()
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()

"""The worker processes of one site (``--workers N``, :mod:`proxy.workers`) and the
private links between them.

Every worker serves the site's SIP ports through sockets of its own, bound with
SO_REUSEPORT: the kernel sends each phone's UDP datagrams to one worker (by source
address and port) and each TCP or TLS connection to the worker that accepted it. Most
messages are handled where they land. Three things cross workers, over a private
loopback link from each worker to each other one (TCP on 127.0.0.1, opened with a
secret the supervisor drew, so no other local process can inject frames):

* **Connections stay where they are.** A request for a phone registered over a TCP or
  TLS connection that another worker holds is built and sent by the worker that routes
  it, as always, but its bytes go over the link to the holder, which writes them to the
  connection (:meth:`Siblings.send`). The routing worker is the one proxy hop (one Via,
  one Record-Route, its own client transaction, loop detection unchanged); the holder is
  only its socket. Workers tell each other which connections they hold as phones
  register over them (``HOLD``) and when they close (``CLOSED``).
* **Responses go to the worker whose transaction sent the request.** A phone answers
  the worker its own datagrams go to, or over its connection, which may not be the
  worker that sent the request. Each worker marks its Via with its index
  (``;p2psip-w=N``, :class:`WorkerIdentity`); a response that matches no transaction
  here and carries another worker's mark is handed to it (:meth:`Siblings.take_response`).
* **Which flow each contact registered over**, for in-dialog requests to phones behind
  NAT routed by a worker that never saw their REGISTER (``NOTED``).

And worker 0, which runs the site's one DHT node and adaptor, serves the others: they
ask it for DHT lookups (``LOCATE``) and tell it which AORs they changed (``CHANGED``);
it reads those from the shared store and publishes them (:mod:`proxy.worker_dht`).

A UDP message needs no link: every worker's socket has the site's port, so a phone
behind NAT sees the same source whichever worker sends.

A frame is a 4-byte length, a 1-byte kind and fields (each a 4-byte length and bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hmac
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, fields
from enum import IntEnum

from .sip.forwarding import ProxyIdentity
from .sip.message import Response
from .transport import Flow, FlowEvents, IntervalLog

log = logging.getLogger(__name__)

WORKER_PARAM = "p2psip-w"  # the Via parameter naming the worker that sent a request
LINK_HOST = "127.0.0.1"
SECRET_BYTES = 32
MAX_FRAME = 1 << 20  # bytes; a SIP message is at most 64 KiB, a DHT record about 8 KiB
MAX_BUFFERED = 16 << 20  # bytes waiting to be written to one sibling before frames drop
MAX_LOCATES = 1000  # DHT lookups waiting for worker 0, per worker
_HEADER = struct.Struct("!IB")
_LENGTH = struct.Struct("!I")
_ID = struct.Struct("!I")

# Set while a worker notes bindings it did not register (at start, or worker 0 noting
# what others changed): those flows are not its to announce.
QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("p2psip_quiet", default=False)


class Kind(IntEnum):
    HELLO = 1  # index, secret: the first frame on a link
    SEND = 2  # flow, message: write it to your connection for this flow
    RESPONSE = 3  # flow, message: a response for your client transaction
    NOTED = 4  # contact, flow: a contact registered here over this flow
    HOLD = 5  # flow: I hold this connection
    CLOSED = 6  # flow: my connection for this flow closed
    CHANGED = 7  # aor: its bindings changed here (to worker 0: publish them)
    LOCATE = 8  # id, aor: look it up in the DHT (to worker 0)
    LOCATED = 9  # id, ok, known, record (or the error): the answer
    USERS = 10  # the users changed (from worker 0): reload them


@dataclass(frozen=True, slots=True)
class WorkerSockets:
    """What the supervisor binds for one worker, before it starts it."""

    udp: socket.socket  # SIP over UDP (SO_REUSEPORT)
    tcp: socket.socket  # SIP over TCP, listening (SO_REUSEPORT)
    tls: socket.socket  # SIP over TLS, listening (SO_REUSEPORT)
    link: socket.socket  # the worker's private link listener on 127.0.0.1

    def all(self) -> tuple[socket.socket, ...]:
        return (self.udp, self.tcp, self.tls, self.link)


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """One worker of ``count``: its sockets and how to reach its siblings."""

    index: int
    count: int
    sockets: WorkerSockets
    link_ports: tuple[int, ...]  # every worker's link port, by index
    secret: bytes = field(repr=False)

    @property
    def runs_dht(self) -> bool:
        """Worker 0 runs the site's DHT node and adaptor, NAT keep-alives, admin API."""
        return self.index == 0


@dataclass(frozen=True, slots=True)
class WorkerIdentity(ProxyIdentity):
    """The proxy's identity in one worker: its Via names the worker (``p2psip-w``), so
    that a response landing in another worker comes back to the one that sent."""

    worker: int = 0

    def via(self, transport: str, branch: str) -> str:
        return f"{ProxyIdentity.via(self, transport, branch)};{WORKER_PARAM}={self.worker}"


def worker_identity(me: ProxyIdentity, worker: int) -> WorkerIdentity:
    values = {f.name: getattr(me, f.name) for f in fields(me)}
    return WorkerIdentity(**values, worker=worker)


@dataclass(slots=True)
class SiblingStats:
    """What crossed the links (``workers_*`` in the site's stats)."""

    sent_via_sibling: int = 0  # messages this worker handed to a connection's holder
    sent_for_sibling: int = 0  # messages this worker wrote to its connections for others
    responses_handed: int = 0  # responses handed to the worker of their transaction
    responses_taken: int = 0  # responses other workers handed here
    dropped: int = 0  # frames lost: link down or backed up, connection gone

    def snapshot(self) -> dict[str, int]:
        return {f"workers_{f.name}": getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class Located:
    """Worker 0's answer to a lookup: whether the overlay knows the AOR, and its live
    bindings as one record (dht_adaptor.record)."""

    known: bool
    record: bytes


@dataclass(slots=True)
class Handlers:
    """What a worker does with its siblings' frames (``Siblings.start``)."""

    identity: ProxyIdentity
    holds: Callable[[Flow], bool]  # the transport holds this connection
    send_held: Callable[[Flow, bytes], bool]  # write to the connection held here
    deliver: Callable[[bytes, Flow], None]  # a message as if received from the flow
    learn_flow: Callable[[str, str], None]  # the directory: contact, flow
    changed: Callable[[str], None] | None = None  # worker 0: publish this AOR
    locate: Callable[[str], Awaitable[Located]] | None = None  # worker 0: a DHT lookup
    users_changed: Callable[[], None] | None = None  # reload the users


class LinkError(Exception):
    """A link to worker 0 is down, or it did not answer in time."""


def pack(*parts: bytes) -> bytes:
    return b"".join(_LENGTH.pack(len(p)) + p for p in parts)


def unpack(payload: bytes) -> list[bytes]:
    """The fields of a frame; ValueError if it is cut short."""
    parts = []
    at = 0
    while at < len(payload):
        if at + 4 > len(payload):
            raise ValueError("truncated field length")
        (n,) = _LENGTH.unpack_from(payload, at)
        at += 4
        if at + n > len(payload):
            raise ValueError("truncated field")
        parts.append(payload[at : at + n])
        at += n
    return parts


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class Siblings:
    """This worker's links to the others (see the module docstring)."""

    def __init__(self, plan: WorkerPlan) -> None:
        self.index = plan.index
        self.count = plan.count
        self.stats = SiblingStats()
        self._plan = plan
        self._handlers: Handlers | None = None
        self._out: dict[int, asyncio.Transport] = {}  # links to siblings, by index
        self._in: dict[int, _InLink] = {}  # their links to us, latest per sibling
        self._holders: dict[tuple[str, int], tuple[str, int]] = {}  # -> (transport, worker)
        self._announced: set[Flow] = set()  # connections held here, told to the others
        self._locates: dict[int, asyncio.Future[tuple[bool, bool, bytes]]] = {}
        self._next_id = 0
        self._serving = 0  # lookups served for the others, in flight
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._backed_up = IntervalLog("frames to a worker that reads too slowly, dropped")

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, handlers: Handlers) -> None:
        """Serve the link listener and keep a link open to every sibling."""
        self._handlers = handlers
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _InLink(self), sock=self._plan.sockets.link)
        for j in range(self.count):
            if j != self.index:
                self._spawn(self._keep_linked(j))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for transport in list(self._out.values()):
            transport.close()
        for link in list(self._in.values()):
            link.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for fut in self._locates.values():
            if not fut.done():
                fut.set_exception(LinkError("stopping"))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_linked(self, j: int) -> None:
        """A link to worker ``j``, opened again whenever it drops (``j`` restarted)."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            closed: asyncio.Future[None] = loop.create_future()
            try:
                transport, _ = await loop.create_connection(
                    functools.partial(_OutLink, closed), LINK_HOST, self._plan.link_ports[j]
                )
            except OSError as exc:
                log.debug("link to worker %d: %s", j, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            self._out[j] = transport
            self._write(j, Kind.HELLO, pack(str(self.index).encode(), self._plan.secret))
            for flow in self._announced:
                self._write(j, Kind.HOLD, pack(str(flow).encode()))
            log.debug("link to worker %d up", j)
            try:
                await closed
            finally:
                if self._out.get(j) is transport:
                    del self._out[j]
            log.debug("link to worker %d down", j)

    # --- writing -----------------------------------------------------------------------

    def _write(self, j: int, kind: Kind, payload: bytes) -> bool:
        transport = self._out.get(j)
        if transport is None or transport.is_closing():
            # Worker j is starting again (the supervisor logs it) or stopping.
            self.stats.dropped += 1
            log.debug("%s to worker %d dropped: no link", kind.name, j)
            return False
        if transport.get_write_buffer_size() > MAX_BUFFERED:
            self.stats.dropped += 1
            now = asyncio.get_running_loop().time()
            self._backed_up.note(now, f"{kind.name} to worker {j}")
            return False
        transport.write(_HEADER.pack(len(payload), kind) + payload)
        return True

    def _broadcast(self, kind: Kind, payload: bytes) -> None:
        for j in range(self.count):
            if j != self.index:
                self._write(j, kind, payload)

    # --- the transport's side (proxy.transport.SiblingFlows) ---------------------------

    def holds(self, host: str, port: int) -> bool:
        return (host, port) in self._holders

    def send(self, flow: Flow, data: bytes) -> bool:
        holder = self._holders.get((flow.host, flow.port))
        if holder is None or holder[0] != flow.transport:
            return False
        if self._write(holder[1], Kind.SEND, pack(str(flow).encode(), data)):
            self.stats.sent_via_sibling += 1
        return True  # taken: the holder's link is the only way to that connection

    def flow_events(self, inner: FlowEvents) -> FlowEvents:
        """``inner`` (the directory), also telling the others of closed connections."""
        return _FlowEventsTee(inner, self)

    def flow_closed(self, flow: Flow) -> None:
        if flow in self._announced:
            self._announced.discard(flow)
            self._broadcast(Kind.CLOSED, pack(str(flow).encode()))

    # --- the router's side -------------------------------------------------------------

    def take_response(self, resp: Response) -> bool:
        """Hand a response that matched no transaction here to the worker its top Via
        names, if that is another one of ours. True if handed."""
        handlers = self._handlers
        if handlers is None:
            return False
        top = resp.top_via
        mark = top.param(WORKER_PARAM)
        if not mark or not mark.isdigit() or not handlers.identity.is_my_via(top.host, top.port):
            return False
        j = int(mark)
        if j == self.index or j >= self.count:
            return False
        if not self._write(j, Kind.RESPONSE, pack(b"udp:127.0.0.1:0", resp.to_bytes())):
            return False  # its worker is away: handled here, as a stray response
        self.stats.responses_handed += 1
        return True

    # --- the directory's side ----------------------------------------------------------

    def flow_noted(self, contact: str, source: str) -> None:
        """A contact was registered here over ``source`` (LocalDirectory's ``on_flow``)."""
        if QUIET.get() or self._handlers is None:
            return
        try:
            flow = Flow.parse(source)
        except ValueError:
            return
        self._broadcast(Kind.NOTED, pack(contact.encode(), source.encode()))
        if flow.reliable and flow not in self._announced and self._handlers.holds(flow):
            self._announced.add(flow)
            self._broadcast(Kind.HOLD, pack(source.encode()))

    # --- the DHT and the users ---------------------------------------------------------

    def changed(self, aor: str) -> None:
        """Tell worker 0 that ``aor``'s bindings changed (it publishes them)."""
        self._write(0, Kind.CHANGED, pack(aor.encode()))

    def users_changed(self) -> None:
        self._broadcast(Kind.USERS, b"")

    async def locate(self, aor: str, timeout: float) -> Located:
        """Worker 0's DHT lookup of ``aor``. Raises LinkError, or LookupFailed with the
        error worker 0 met."""
        if len(self._locates) >= MAX_LOCATES:
            raise LinkError(f"{len(self._locates)} DHT lookups already wait for worker 0")
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        ident = self._next_id
        fut: asyncio.Future[tuple[bool, bool, bytes]] = asyncio.get_running_loop().create_future()
        self._locates[ident] = fut
        try:
            if not self._write(0, Kind.LOCATE, pack(_ID.pack(ident), aor.encode())):
                raise LinkError("worker 0 (the site's DHT node) is not reachable")
            try:
                async with asyncio.timeout(timeout):
                    ok, known, body = await fut
            except TimeoutError:
                raise LinkError(f"worker 0 did not answer within {timeout:.1f} s") from None
        finally:
            self._locates.pop(ident, None)
        if not ok:
            raise LookupFailed(_text(body))
        return Located(known, body)

    async def _serve_locate(self, j: int, ident: bytes, aor: str) -> None:
        handlers = self._handlers
        assert handlers is not None and handlers.locate is not None
        try:
            found = await handlers.locate(aor)
        except Exception as exc:  # the asker answers 503 with it: any failure will do
            self._write(j, Kind.LOCATED, pack(ident, b"\0", b"\0", str(exc).encode()))
        else:
            known = b"\1" if found.known else b"\0"
            self._write(j, Kind.LOCATED, pack(ident, b"\1", known, found.record))
        finally:
            self._serving -= 1

    # --- reading -----------------------------------------------------------------------

    def _hello(self, link: _InLink, payload: bytes) -> int | None:
        try:
            index_text, secret = unpack(payload)
            j = int(index_text)
        except ValueError:
            return None
        if not hmac.compare_digest(secret, self._plan.secret) or not 0 <= j < self.count:
            return None
        old = self._in.get(j)
        self._in[j] = link
        if old is not None:
            old.close()
        self._forget_holder(j)  # it tells again what it holds
        return j

    def _lost(self, j: int, link: _InLink) -> None:
        if self._in.get(j) is link:
            del self._in[j]
            self._forget_holder(j)

    def _forget_holder(self, j: int) -> None:
        for key in [k for k, (_, w) in self._holders.items() if w == j]:
            del self._holders[key]

    def _dispatch(self, j: int, kind: int, payload: bytes) -> None:
        handlers = self._handlers
        if handlers is None:
            return
        parts = unpack(payload)
        if kind == Kind.SEND:
            flow = Flow.parse(_text(parts[0]))
            if handlers.send_held(flow, parts[1]):
                self.stats.sent_for_sibling += 1
            else:
                self.stats.dropped += 1
                log.debug("no connection %s here any more for worker %d", flow, j)
        elif kind == Kind.RESPONSE:
            self.stats.responses_taken += 1
            handlers.deliver(parts[1], Flow.parse(_text(parts[0])))
        elif kind == Kind.NOTED:
            handlers.learn_flow(_text(parts[0]), _text(parts[1]))
        elif kind == Kind.HOLD:
            flow = Flow.parse(_text(parts[0]))
            self._holders[(flow.host, flow.port)] = (flow.transport, j)
        elif kind == Kind.CLOSED:
            flow = Flow.parse(_text(parts[0]))
            if self._holders.get((flow.host, flow.port)) == (flow.transport, j):
                del self._holders[(flow.host, flow.port)]
        elif kind == Kind.CHANGED:
            if handlers.changed is not None:
                handlers.changed(_text(parts[0]))
        elif kind == Kind.LOCATE:
            ident, aor = parts
            if handlers.locate is None or self._serving >= MAX_LOCATES:
                self._write(j, Kind.LOCATED, pack(ident, b"\0", b"\0", b"busy"))
                return
            self._serving += 1
            self._spawn(self._serve_locate(j, ident, _text(aor)))
        elif kind == Kind.LOCATED:
            ident, ok, known, body = parts
            fut = self._locates.get(_ID.unpack(ident)[0])
            if fut is not None and not fut.done():
                fut.set_result((ok == b"\1", known == b"\1", body))
        elif kind == Kind.USERS:
            if handlers.users_changed is not None:
                handlers.users_changed()
        else:
            log.debug("unknown frame kind %d from worker %d", kind, j)


class LookupFailed(Exception):
    """Worker 0 could not look the AOR up (its message says why)."""


class _OutLink(asyncio.Protocol):
    """Our side of a link to a sibling: we only write to it."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self._closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


class _InLink(asyncio.Protocol):
    """A sibling's link to us: HELLO with the secret first, then frames."""

    def __init__(self, siblings: Siblings) -> None:
        self._siblings = siblings
        self._buffer = bytearray()
        self._sender: int | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        at = 0
        while len(buffer) - at >= _HEADER.size:
            length, kind = _HEADER.unpack_from(buffer, at)
            if length > MAX_FRAME:
                log.warning("closing a worker link: a frame of %d bytes", length)
                self.close()
                return
            end = at + _HEADER.size + length
            if len(buffer) < end:
                break
            payload = bytes(buffer[at + _HEADER.size : end])
            at = end
            if self._sender is None:
                if kind != Kind.HELLO:
                    self.close()
                    return
                self._sender = self._siblings._hello(self, payload)
                if self._sender is None:
                    log.warning("closing a link that did not prove it is one of our workers")
                    self.close()
                    return
                continue
            try:
                self._siblings._dispatch(self._sender, kind, payload)
            except (ValueError, IndexError, struct.error) as exc:
                log.warning("bad frame %d from worker %d: %s", kind, self._sender, exc)
            except Exception:  # a bug handling one frame must not end the link
                log.exception("handling frame %d from worker %d", kind, self._sender)
        del buffer[:at]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sender is not None:
            self._siblings._lost(self._sender, self)


class _FlowEventsTee:
    def __init__(self, inner: FlowEvents, siblings: Siblings) -> None:
        self._inner = inner
        self._siblings = siblings

    def flow_closed(self, flow: Flow) -> None:
        self._inner.flow_closed(flow)
        self._siblings.flow_closed(flow)

    def flow_heard(self, flow: Flow) -> None:
        self._inner.flow_heard(flow)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Inside: bindings noted are not announced to the other workers."""
    token = QUIET.set(True)
    try:
        yield
    finally:
        QUIET.reset(token)

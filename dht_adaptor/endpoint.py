"""The datagram side of a DHT node: sealing, opening, requests, answers and timeouts.

:class:`Endpoint` is the half of :class:`~dht_adaptor.protocol.NodeProtocol` that moves
rpcudp datagrams (kind byte, message id, msgpack body) between peers; the other half
(the RPC handlers, routing and replication) is in ``protocol.py``. It imports nothing of
the DHT engine but keeps rpcudp's ``_outstanding`` table, which the engine contract
test checks. What it does (issue 11):

* **Sessions.** Datagrams are sealed and opened by :class:`~dht_adaptor.session.Sessions`:
  signed until two nodes share a session key, then a MAC.
* **Handled where they arrive.** Answers, pings and find_node requests are handled in
  ``datagram_received`` itself, with no task per datagram: an answer that arrived in
  time is never beaten by its own timeout because the loop was busy. Stores and
  find_value (which may wait on Redis) run as tasks, at most ``max_requests`` at once;
  past that a request is answered "busy" at once (the caller keeps us as a live peer).
* **Our lateness is not the peer's fault.** A heartbeat measures how late the event
  loop runs; an RPC that timed out while we were late fails with ``LAGGED``, which
  leaves its node alone (see ``NodeProtocol._call``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
from collections.abc import Callable, Coroutine
from typing import Any

from dht_adaptor.membership import Member, NotAMember, Refusal, RefusalLog, Sender
from dht_adaptor.record import WIRE_LIMIT
from dht_adaptor.session import Sessions
from dht_adaptor.stats import DhtStats
from dht_adaptor.wire import RPC_NAMES, UNPACK_ERRORS, claimed_id, is_node_id, pack, unpack

__all__ = [
    "BUSY",
    "LAGGED",
    "MAX_BACKGROUND",
    "OTHER_NODE",
    "BadRequest",
    "Endpoint",
    "RpcTooLarge",
]

log = logging.getLogger("dht_adaptor.protocol")  # one logger for the protocol and its endpoint

Address = tuple[str, int]
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any] | None"]

OTHER_NODE = object()  # the answer to a call came from another node id than the one asked
LAGGED = object()  # the call timed out while our own event loop was late
BUSY = {"busy": True}  # the answer of a node whose request queue is full
ASYNC_RPCS = frozenset({"store", "find_value", "offer"})  # may wait on the record store
MAX_BACKGROUND = 256  # replication, repair and confirmation jobs at once
_BEAT = 0.1  # seconds between two heartbeats measuring the loop's lateness


class BadRequest(Exception):
    """A request we do not answer (wrong argument types); logged at debug."""


class RpcTooLarge(ValueError):
    """An RPC over rpcudp's size limit (peers' stubs would refuse it)."""


class Endpoint:
    """Mixin for NodeProtocol: the attributes below are set by its ``__init__``."""

    transport: Any
    _outstanding: dict[bytes, tuple[asyncio.Future[tuple[bool, Any]], asyncio.TimerHandle]]
    _wait_timeout: float
    _member: Member
    _sessions: Sessions
    _use_sessions: bool
    _clock: Callable[[], float]
    _stats: DhtStats
    _spawn: Spawn
    _refusals: RefusalLog
    _closed: bool
    _family: Any
    _signatures: dict[str, inspect.Signature]
    _expect: dict[bytes, tuple[str, bytes | None, float, float]]
    _max_requests: int
    requests: int
    _background: set[asyncio.Task[Any]]
    _lag_limit: float
    _lag_at: float
    lag: float
    _beat_due: float
    _beat: asyncio.TimerHandle | None
    source_node: Any

    def _init_endpoint(self, rpc_timeout: float, max_requests: int) -> None:
        self._expect = {}  # msg id -> (rpc, node id asked, loop time sent, timeout)
        self._refusals = RefusalLog()
        self._closed = False
        self._signatures = {}
        self._max_requests = max_requests
        self.requests = 0  # async request handlers running
        self._background = set()
        self._lag_limit = max(0.05, rpc_timeout / 5)
        self._lag_at = -math.inf  # loop time the heartbeat last found the loop late
        self.lag = 0.0  # recent lateness of the loop, seconds (decays)
        self._beat_due = 0.0
        self._beat = None

    def _alive(self, address: Address) -> None:
        """A member's datagram came from ``address`` (NodeProtocol clears dead marks)."""

    def _answered_by(self, node_id: bytes, address: Address) -> None:
        """A member answered from ``address`` (NodeProtocol makes it a contact)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._family = sock.family
        loop = asyncio.get_running_loop()
        self._beat_due = loop.time() + _BEAT
        self._beat = loop.call_at(self._beat_due, self._heartbeat)

    def _heartbeat(self) -> None:
        if self._closed:
            return
        now = self._now()
        late = now - self._beat_due
        if late > self._lag_limit:
            self._lag_at = now
        self.lag = max(late, self.lag * 0.9)
        self._beat_due = now + _BEAT
        self._beat = asyncio.get_running_loop().call_at(self._beat_due, self._heartbeat)

    def _lagging_since(self, since: float) -> bool:
        """Was our own loop late at some point since loop time ``since``?"""
        return self._lag_at >= since

    # -- receiving ---------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Membership first, synchronously: a non-member costs no task, and nothing it
        # sends changes any state but the refusal counters.
        if self._closed:
            return
        address = (addr[0], addr[1])
        sender = self._admit(data, address)
        if sender is not None:
            self._alive(address)  # a member: it is alive after all
            self._handle(sender, address)

    async def _solve_datagram(self, datagram: bytes, address: Any) -> None:
        # rpcudp's datagram_received calls this; ours admits and handles itself.
        self.datagram_received(datagram, address)

    def _admit(self, data: bytes, address: Address) -> Sender | None:
        try:
            return self._sessions.open(data, self._clock(), address)
        except NotAMember as exc:
            self._refuse(exc.reason, address, exc.key_id)
            if exc.reason is Refusal.NO_SESSION:
                # We restarted and the peer still speaks our old session: offer a new one.
                self.spawn_background(self.ping_address(address))
            return None

    def _refuse(self, reason: Refusal, address: Address, key_id: str | None) -> None:
        self._stats.refused[reason] += 1
        key = "" if key_id is None else f" {key_id}"
        detail = f"{reason.text}{key} from {address[0]}:{address[1]}"
        line = self._refusals.note(self._now(), detail)
        if line is not None:
            log.warning("%s", line)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _handle(self, sender: Sender, address: Address) -> None:
        datagram = sender.datagram
        if len(datagram) < 22:
            log.debug("datagram of %d bytes from %s ignored", len(datagram), address)
            return
        msg_id = datagram[1:21]
        try:
            data = unpack(datagram[21:])
        except UNPACK_ERRORS as exc:
            log.debug("undecodable datagram from %s: %r", address, exc)
            return
        if datagram[:1] == b"\x00":
            claimed = claimed_id(data)
            if claimed is not None and claimed != sender.node_id:
                # A request naming another node id than its proof is bound to.
                self._refuse(Refusal.WRONG_NODE_ID, address, sender.key_id)
                return
            self._request_received(msg_id, data, address, sender)
        elif datagram[:1] == b"\x01":
            if self._from_whom_we_asked(msg_id, data, sender, address):
                self._accept_response(msg_id, data, address)
        else:
            log.debug("datagram of unknown kind from %s ignored", address)

    def _from_whom_we_asked(
        self, msg_id: bytes, data: Any, sender: Sender, address: Address
    ) -> bool:
        """Is this answer from the node id we asked (and a ping answer naming its own id)?

        If not (a node restarted with a new id at the same address, or a peer that listed
        a made-up contact), the call fails at once, without a dead mark for the address,
        and the node that did answer is a contact like any member that writes to us.
        """
        expected = self._expect.pop(msg_id, None)
        if expected is None:
            return True  # late or unknown: _accept_response drops it
        rpc, node_id, _, _ = expected
        if (node_id is None or node_id == sender.node_id) and (
            rpc != "ping" or data == sender.node_id
        ):
            return True
        self._stats.other_node_answers += 1
        log.debug("answer to %s from %s is from another node id", rpc, address)
        self._settle(msg_id, (False, OTHER_NODE))
        self._answered_by(sender.node_id, address)
        return False

    def _settle(self, msg_id: bytes, result: tuple[bool, Any]) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None:
            future, timer = entry
            timer.cancel()
            if not future.done():
                future.set_result(result)

    def _accept_response(self, msg_id: bytes, data: Any, address: Any) -> None:
        if msg_id not in self._outstanding:  # usually an answer that came after its timeout
            log.debug("late or unknown response from %s ignored", address)
            return
        self._settle(msg_id, (True, data))

    def _request_received(self, msg_id: bytes, data: Any, address: Address, sender: Sender) -> None:
        call = self._bound_call(data, address)
        if call is None:
            return
        name, func, args = call
        if name not in ASYNC_RPCS:
            try:
                response = func(address, *args)
            except BadRequest as exc:
                log.debug("rpc_%s from %s ignored: %s", name, address, exc)
                return
            self._answer(msg_id, response, address, sender)
        elif self.requests >= self._max_requests:
            self._stats.shed += 1
            self._answer(msg_id, BUSY, address, sender)
        else:
            self.requests += 1
            self._spawn(self._answer_later(msg_id, name, func, args, address, sender))

    def _bound_call(
        self, data: Any, address: Address
    ) -> tuple[str, Callable[..., Any], list[Any]] | None:
        if not (
            isinstance(data, list)
            and len(data) == 2
            and data[0] in RPC_NAMES
            and isinstance(data[1], list)
        ):
            log.debug("malformed request from %s ignored", address)
            return None
        name, args = data
        func = getattr(self, f"rpc_{name}")
        signature = self._signatures.get(name)
        if signature is None:
            signature = self._signatures[name] = inspect.signature(func)
        try:
            signature.bind(address, *args)
        except TypeError:
            log.debug("rpc_%s from %s with %d arguments ignored", name, address, len(args))
            return None
        return name, func, args

    async def _answer_later(
        self,
        msg_id: bytes,
        name: str,
        func: Callable[..., Any],
        args: list[Any],
        address: Address,
        sender: Sender | None,
    ) -> None:
        try:
            response = func(address, *args)
            if inspect.isawaitable(response):
                response = await response
        except BadRequest as exc:
            log.debug("rpc_%s from %s ignored: %s", name, address, exc)
            return
        finally:
            self.requests -= 1
        self._answer(msg_id, response, address, sender)

    async def _accept_request(self, msg_id: bytes, data: Any, address: Any) -> None:
        # rpcudp's path (unused by our datagram_received): answer signed, as to a stranger.
        call = self._bound_call(data, (address[0], address[1]))
        if call is not None:
            self.requests += 1
            await self._answer_later(msg_id, *call, (address[0], address[1]), None)

    def _answer(
        self, msg_id: bytes, response: Any, address: Address, sender: Sender | None
    ) -> None:
        if not self._closed:
            node_id = None if sender is None else sender.node_id
            legacy = sender is not None and sender.legacy
            self._send(b"\x01" + msg_id + pack(response), address, node_id, legacy=legacy)

    def _timeout(self, msg_id: bytes) -> None:
        self._stats.rpc_timeouts += 1
        expected = self._expect.pop(msg_id, None)
        entry = self._outstanding.pop(msg_id, None)
        now = self._now()
        sent, wait = (expected[2], expected[3]) if expected is not None else (now, 0.0)
        late = now - sent - wait
        if late > self._lag_limit or self._lagging_since(sent):
            self._stats.rpc_timeouts_lagged += 1
            result: tuple[bool, Any] = (False, LAGGED)
        else:
            result = (False, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(result)

    # -- sending -----------------------------------------------------------------------

    def _send(
        self, datagram: bytes, address: Address, node_id: bytes | None, *, legacy: bool = False
    ) -> None:
        """Send an rpcudp datagram sealed for ``node_id`` (session MAC or signature)."""
        now = self._clock()
        if self._use_sessions:
            sealed = self._sessions.seal(datagram, now, node_id, address, legacy=legacy)
        else:
            sealed = self._member.seal(datagram, now)
        self.transport.sendto(sealed, address)

    def _request(
        self,
        address: Address,
        rpc: str,
        args: tuple[Any, ...],
        expect: bytes | None,
        timeout: float | None = None,
    ) -> asyncio.Future[tuple[bool, Any]]:
        """rpcudp's stub, sealed, remembering whom we asked: the future's result is
        (True, answer) or (False, None) after ``rpc_timeout``. ``expect``: the node id
        that must answer (None: any member; a ping answer must name the sender's id)."""
        msg_id = os.urandom(20)
        payload = pack([rpc, args])
        if len(payload) > WIRE_LIMIT:  # rpcudp's limit: peers' stubs refuse larger ones
            raise RpcTooLarge(f"an RPC of {len(payload)} bytes is over {WIRE_LIMIT}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        self._send(b"\x00" + msg_id + payload, address, expect)
        wait = self._wait_timeout if timeout is None else timeout
        timer = loop.call_later(wait, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timer)
        self._expect[msg_id] = (rpc, expect, loop.time(), wait)
        return future

    async def ping_address(self, address: Address) -> bytes | None:
        """The node id of the member answering a ping at ``address``, or None."""
        if self._closed:
            return None
        ok, node_id = await self._request(address, "ping", (self.source_node.id,), None)
        return bytes(node_id) if ok and is_node_id(node_id) else None

    # -- background work ---------------------------------------------------------------

    def spawn_background(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        """Spawn a replication, repair or confirmation job, unless MAX_BACKGROUND run
        already (then it is shed and counted: the work is redone by repair later)."""
        if len(self._background) >= MAX_BACKGROUND or self._closed:
            coro.close()
            self._stats.shed += 1
            return None
        task = self._spawn(coro)
        if task is not None:
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return task

    @property
    def background(self) -> int:
        return len(self._background)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

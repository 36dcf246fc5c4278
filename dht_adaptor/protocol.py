"""The kademlia/rpcudp protocol of a DHT node: RPC handlers, calls and membership.

:class:`NodeProtocol` subclasses kademlia 2.2.3's ``KademliaProtocol`` (itself rpcudp
5.0.1's ``RPCProtocol``) and overrides private internals of both, which is why
``pyproject.toml`` pins their exact versions and ``tests/dht/test_engine_contract.py``
checks every name used here. What it changes:

* **Merged, verified values.** ``rpc_store`` hands the bytes to a
  :class:`~dht_adaptor.record_store.RecordStore`, which verifies every binding and merges
  it into what it holds; ``rpc_find_value`` answers from that store.
* **Dead nodes cost little.** The RPC timeout is configurable (kademlia waits 5 s), a
  timed-out address is skipped by our own lookups for ``dead_ttl`` seconds (any datagram
  from it clears that at once), and it leaves the routing table (kademlia already does).
  The dead contacts are remembered, so that a lookup that found no value while it
  skipped some can ask them once more (:meth:`NodeProtocol.dead_near`): after a
  partition heals, the far side's records are found at the first retry.
* **A closed overlay.** Every datagram sent is sealed with the site key and every one
  received is opened (:mod:`dht_adaptor.membership`) before anything else: a datagram
  without valid proof of a trusted site is counted, logged once per interval and
  dropped, never answered, and never clears a dead mark or enters the routing table. A
  request must name the node id bound to its proof, and an answer must come from the
  node id we asked (``_request`` replaces rpcudp's stub for that; the stub is unused).
* **Robust to bad peers.** Undecodable datagrams, unknown RPCs, wrong argument counts or
  types, node lists with hostnames or bad ids are dropped and logged at debug level; they
  never raise inside a task or send a traceback to the log.
* **welcome_if_new** no longer re-digests keys that already are digests (kademlia
  computes ``digest(key)`` of the 20-byte key, so it picked the wrong nodes to replicate
  to); replication to a new close node goes through the same merge.

Also here: :class:`DhtStats` (the counters the protocol and ``DhtNode`` share), the
node-id and datagram argument checks, and :func:`record_chunks`, which splits a record
too large for one store RPC into records that merge in like the whole.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import math
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage
from rpcudp.exceptions import MalformedMessage

from dht_adaptor.keys import TrustStore
from dht_adaptor.membership import Member, NotAMember, Refusal, RefusalLog, Sender, open_datagram
from dht_adaptor.record import WIRE_LIMIT, DhtBinding, RecordError, RecordTooLarge, encode_record
from dht_adaptor.record_store import MAX_HELD_BYTES, RecordStore, RecordStoreError

__all__ = [
    "Address",
    "Bindings",
    "DhtStats",
    "Latency",
    "NoStorage",
    "NodeProtocol",
    "Spawn",
    "is_node_id",
    "record_chunks",
]

log = logging.getLogger(__name__)

_ID_BYTES = 20
_MAX_NODES_IN_ANSWER = 64  # a find_node answer holds k nodes; more is a peer misbehaving
_UNPACK_ERRORS = (umsgpack.UnpackException, ValueError, OverflowError, RecursionError, struct.error)
_RPC_NAMES = frozenset({"ping", "stun", "store", "find_node", "find_value"})

_MAX_DEAD = 4096  # dead marks kept (oldest dropped first); a lookup meets at most k per answer
_OTHER_NODE = object()  # the answer to a call came from another node id than the one asked

_MIN_PATIENCE = 0.05  # seconds; see NodeProtocol.patience
_PATIENCE_FACTOR = 3.0
_RTT_SAMPLES = 64
_MIN_RTT_SAMPLES = 8

Address = tuple[str, int]
Bindings = tuple[DhtBinding, ...]
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any] | None"]


@dataclass(slots=True)
class Latency:
    """Durations of one kind of operation, in seconds."""

    count: int = 0
    last: float = 0.0
    total: float = 0.0
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.last = seconds
        self.total += seconds
        self.max = max(self.max, seconds)


@dataclass(slots=True)
class DhtStats:
    """Counters of one node; :meth:`DhtNode.stats` adds the store's."""

    puts_ok: int = 0
    puts_failed: int = 0
    gets_ok: int = 0
    gets_failed: int = 0
    rpc_timeouts: int = 0
    rejected_on_get: int = 0  # bindings in find_value answers that failed verification
    repairs: int = 0  # records sent by read repair, replication and republishing
    refused: dict[Refusal, int] = field(default_factory=lambda: dict.fromkeys(Refusal, 0))
    other_node_answers: int = 0  # answers from a node id we did not ask (a restart, say)
    get_retries: int = 0  # lookups repeated with known-dead contacts re-admitted
    put_latency: Latency = field(default_factory=Latency)
    get_latency: Latency = field(default_factory=Latency)

    def snapshot(self, *, accepted: int, rejected: int, peers: int) -> dict[str, float]:
        """The counters as ``DhtNode.stats`` returns them, with the store's and the peers."""
        return {
            "puts_ok": self.puts_ok,
            "puts_failed": self.puts_failed,
            "gets_ok": self.gets_ok,
            "gets_failed": self.gets_failed,
            "rejected": rejected,
            "accepted": accepted,
            "rejected_on_get": self.rejected_on_get,
            "rpc_timeouts": self.rpc_timeouts,
            "repairs": self.repairs,
            "refused_datagrams": sum(self.refused.values()),
            **{f"refused_{reason.value}": n for reason, n in self.refused.items()},
            "other_node_answers": self.other_node_answers,
            "get_retries": self.get_retries,
            "put_latency_last": self.put_latency.last,
            "put_latency_total": self.put_latency.total,
            "put_latency_max": self.put_latency.max,
            "get_latency_last": self.get_latency.last,
            "get_latency_total": self.get_latency.total,
            "get_latency_max": self.get_latency.max,
            "peers": peers,
        }


class _BadRequest(Exception):
    """A request we do not answer (wrong argument types); logged at debug."""


def is_node_id(value: object) -> bool:
    """Is ``value`` a kademlia node id or key (20 bytes)?"""
    return isinstance(value, bytes) and len(value) == _ID_BYTES


def _checked_id(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != _ID_BYTES:
        raise _BadRequest(f"{what} is not {_ID_BYTES} bytes")
    return value


def _claimed_id(request: object) -> bytes | None:
    """The node id a request names as its sender (its first argument), if it names one."""
    if not (isinstance(request, list) and len(request) == 2 and isinstance(request[1], list)):
        return None
    args = request[1]
    return bytes(args[0]) if args and is_node_id(args[0]) else None


def record_chunks(bindings: Bindings) -> list[bytes]:
    """Records of at most MAX_RECORD_BYTES that together carry ``bindings``."""
    if not bindings:
        return []
    try:
        return [encode_record(bindings)]
    except RecordTooLarge:
        if len(bindings) == 1:
            log.warning("binding of %s too large for one record; not sent", bindings[0].aor)
            return []
        half = len(bindings) // 2
        return record_chunks(bindings[:half]) + record_chunks(bindings[half:])


class NoStorage(IStorage):  # type: ignore[misc]
    """kademlia's own storage, unused: records live in the RecordStore."""

    def __setitem__(self, key: bytes, value: object) -> None:
        raise RuntimeError("DHT values go through the RecordStore")

    def __getitem__(self, key: bytes) -> object:
        raise KeyError(key)

    def get(self, key: bytes, default: object = None) -> object:
        return default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, object]]:
        return []

    def __iter__(self) -> Any:
        return iter(())


class NodeProtocol(KademliaProtocol):  # type: ignore[misc]
    """kademlia's protocol for members only, with merged, verified values and defensive
    request handling."""

    def __init__(
        self,
        source_node: Node,
        ksize: int,
        *,
        member: Member,
        trust: TrustStore,
        store: RecordStore,
        clock: Callable[[], float],
        stats: DhtStats,
        spawn: Spawn,
        rpc_timeout: float,
        dead_ttl: float,
        hedge: bool,
    ) -> None:
        if bytes(source_node.id) != member.node_id:
            raise ValueError("the node id is not the one bound to the site key and salt")
        super().__init__(source_node, NoStorage(), ksize)
        self._wait_timeout = rpc_timeout  # rpcudp's per-RPC timeout
        self._member = member
        self._trust = trust  # asked at every datagram: never copy keys out of it
        self._store = store
        self._clock = clock
        self._stats = stats
        self._spawn = spawn
        self._dead_ttl = dead_ttl
        # address -> (loop time it timed out, the contact): see is_dead and dead_near
        self._dead: dict[Address, tuple[float, Node]] = {}
        self._expect: dict[bytes, tuple[str, bytes | None]] = {}  # msg id -> (rpc, node id)
        self._refusals = RefusalLog()
        self._closed = False
        self._family = socket.AF_INET
        self._signatures: dict[str, inspect.Signature] = {}
        self._hedge = hedge
        self._rtts: deque[float] = deque(maxlen=_RTT_SAMPLES)  # of recent answered RPCs
        self._welcomed: dict[bytes, float] = {}  # node id -> loop time we replicated to it

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._family = sock.family

    # -- receiving ---------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Membership first, synchronously: a non-member costs no task, and nothing it
        # sends changes any state but the refusal counters.
        if self._closed:
            return
        address = (addr[0], addr[1])
        sender = self._admit(data, address)
        if sender is not None:
            self._dead.pop(address, None)  # a member: it is alive after all
            self._spawn(self._dispatch(sender, address))

    async def _solve_datagram(self, datagram: bytes, address: Any) -> None:
        # rpcudp's datagram_received calls this; ours admits and dispatches itself.
        sender = self._admit(datagram, (address[0], address[1]))
        if sender is not None:
            await self._dispatch(sender, (address[0], address[1]))

    def _admit(self, data: bytes, address: Address) -> Sender | None:
        try:
            return open_datagram(data, self._trust, self._clock())
        except NotAMember as exc:
            self._refuse(exc.reason, address, exc.key_id)
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

    async def _dispatch(self, sender: Sender, address: Address) -> None:
        datagram = sender.datagram
        if len(datagram) < 22:
            log.debug("datagram of %d bytes from %s ignored", len(datagram), address)
            return
        msg_id = datagram[1:21]
        try:
            data = umsgpack.unpackb(datagram[21:])
        except _UNPACK_ERRORS as exc:
            log.debug("undecodable datagram from %s: %r", address, exc)
            return
        if datagram[:1] == b"\x00":
            claimed = _claimed_id(data)
            if claimed is not None and claimed != sender.node_id:
                # A request naming another node id than its proof is bound to.
                self._refuse(Refusal.WRONG_NODE_ID, address, sender.key_id)
                return
            await self._accept_request(msg_id, data, address)
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
        rpc, node_id = expected
        if (node_id is None or node_id == sender.node_id) and (
            rpc != "ping" or data == sender.node_id
        ):
            return True
        self._stats.other_node_answers += 1
        log.debug("answer to %s from %s is from another node id", rpc, address)
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None:
            future, timer = entry
            timer.cancel()
            if not future.done():
                future.set_result((False, _OTHER_NODE))
        self.welcome_if_new(Node(sender.node_id, address[0], address[1]))
        return False

    def _accept_response(self, msg_id: bytes, data: Any, address: Any) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is None:  # usually an answer that came after its timeout
            log.debug("late or unknown response from %s ignored", address)
            return
        future, timer = entry
        timer.cancel()
        if not future.done():
            future.set_result((True, data))

    async def _accept_request(self, msg_id: bytes, data: Any, address: Any) -> None:
        if not (
            isinstance(data, list)
            and len(data) == 2
            and data[0] in _RPC_NAMES
            and isinstance(data[1], list)
        ):
            log.debug("malformed request from %s ignored", address)
            return
        name, args = data
        func = getattr(self, f"rpc_{name}")
        signature = self._signatures.get(name)
        if signature is None:
            signature = self._signatures[name] = inspect.signature(func)
        try:
            signature.bind(address, *args)
        except TypeError:
            log.debug("rpc_%s from %s with %d arguments ignored", name, address, len(args))
            return
        try:
            response = func(address, *args)
            if inspect.isawaitable(response):
                response = await response
        except _BadRequest as exc:
            log.debug("rpc_%s from %s ignored: %s", name, address, exc)
            return
        if not self._closed:
            self._send(b"\x01" + msg_id + umsgpack.packb(response), address)

    def _timeout(self, msg_id: bytes) -> None:
        self._stats.rpc_timeouts += 1
        self._expect.pop(msg_id, None)
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

    # -- sending -----------------------------------------------------------------------

    def _send(self, datagram: bytes, address: Address) -> None:
        """Send an rpcudp datagram, sealed with our proof of membership."""
        self.transport.sendto(self._member.seal(datagram, self._clock()), address)

    def _request(
        self, address: Address, rpc: str, args: tuple[Any, ...], expect: bytes | None
    ) -> asyncio.Future[tuple[bool, Any]]:
        """rpcudp's stub, sealed, remembering whom we asked: the future's result is
        (True, answer) or (False, None) after ``rpc_timeout``. ``expect``: the node id
        that must answer (None: any member; a ping answer must name the sender's id)."""
        msg_id = os.urandom(20)
        payload = umsgpack.packb([rpc, args])
        if len(payload) > WIRE_LIMIT:  # rpcudp's limit: peers' stubs refuse larger ones
            raise MalformedMessage(f"an RPC of {len(payload)} bytes is over {WIRE_LIMIT}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        self._send(b"\x00" + msg_id + payload, address)
        timer = loop.call_later(self._wait_timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = (future, timer)
        self._expect[msg_id] = (rpc, expect)
        return future

    async def ping_address(self, address: Address) -> bytes | None:
        """The node id of the member answering a ping at ``address``, or None."""
        if self._closed:
            return None
        ok, node_id = await self._request(address, "ping", (self.source_node.id,), None)
        return bytes(node_id) if ok and is_node_id(node_id) else None

    # -- RPC handlers ------------------------------------------------------------------

    def _source(self, sender: Any, nodeid: object) -> Node:
        return Node(_checked_id(nodeid, "node id"), sender[0], sender[1])

    def rpc_ping(self, sender: Any, nodeid: object) -> bytes:
        self.welcome_if_new(self._source(sender, nodeid))
        return bytes(self.source_node.id)

    async def rpc_store(self, sender: Any, nodeid: object, key: object, value: object) -> bool:
        source = self._source(sender, nodeid)
        dkey = _checked_id(key, "key")
        self.welcome_if_new(source)
        try:
            # merge_in checks the value's type, so non-bytes values count as rejected.
            result = await self._store.merge_in(dkey, value, self._clock())  # type: ignore[arg-type]
        except RecordStoreError as exc:
            log.warning("cannot store record for key %s: %s", dkey.hex(), exc)
            return False
        return result.ok

    def rpc_find_node(self, sender: Any, nodeid: object, key: object) -> list[tuple[Any, ...]]:
        source = self._source(sender, nodeid)
        dkey = _checked_id(key, "key")
        self.welcome_if_new(source)
        neighbors = self.router.find_neighbors(Node(dkey), exclude=source)
        return [tuple(n) for n in neighbors]

    async def rpc_find_value(self, sender: Any, nodeid: object, key: object) -> Any:
        source = self._source(sender, nodeid)
        dkey = _checked_id(key, "key")
        self.welcome_if_new(source)
        try:
            held = await self._store.get(dkey, self._clock())
            if held:
                return {"value": encode_record(held, max_bytes=MAX_HELD_BYTES)}
        except (RecordStoreError, RecordError) as exc:
            log.warning("cannot read record for key %s: %s", dkey.hex(), exc)
        neighbors = self.router.find_neighbors(Node(dkey), exclude=source)
        return [tuple(n) for n in neighbors]

    # -- calling -----------------------------------------------------------------------

    async def resolve(self, host: str, port: int) -> Address | None:
        """``(ip, port)`` of ``host`` in this socket's address family, or None (logged)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=self._family, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            log.warning("cannot resolve DHT bootstrap node %s:%s: %s", host, port, exc)
            return None
        if not infos:
            return None
        sockaddr = infos[0][4]
        return (str(sockaddr[0]), int(sockaddr[1]))

    def live_neighbors(self, target: Node) -> list[Node]:
        """The k closest contacts to ``target`` in the routing table, known-dead ones left out."""
        return [n for n in self.router.find_neighbors(target) if not self.is_dead((n.ip, n.port))]

    def is_dead(self, address: Address) -> bool:
        """Did ``address`` time out less than ``dead_ttl`` ago (with nothing heard since)?"""
        entry = self._dead.get(address)
        if entry is None:
            return False
        if self._now() - entry[0] < self._dead_ttl:
            return True
        del self._dead[address]
        return False

    def dead_near(self, target: Node) -> list[Node]:
        """The k known-dead contacts closest to ``target``, nearest first.

        They may be back (a partition healed, say): a lookup that missed records retries
        with them re-admitted (``DhtNode.get``), so they are remembered, not just marked.
        """
        horizon = self._now() - self._dead_ttl
        dead = [node for since, node in self._dead.values() if since > horizon]
        return sorted(dead, key=lambda n: n.distance_to(target))[: self.router.ksize]

    def forget_dead(self, address: Address) -> None:
        """Let calls to ``address`` go out again (it times out again if still dead)."""
        self._dead.pop(address, None)

    def _mark_dead(self, node: Node) -> None:
        address = (node.ip, node.port)
        self._dead.pop(address, None)  # re-inserted: the dict stays oldest first
        if len(self._dead) >= _MAX_DEAD:
            self._dead.pop(next(iter(self._dead)))
        self._dead[address] = (self._now(), node)

    async def _call(self, node: Node, rpc: str, *args: Any) -> tuple[bool, Any]:
        address = (node.ip, node.port)
        if self._closed:
            return (False, None)
        if self.is_dead(address):
            self._forget_contact(node)
            return (False, None)
        sent = self._now()
        future = self._request(address, rpc, (self.source_node.id, *args), bytes(node.id))
        result = await future
        if result[0]:
            self._rtts.append(self._now() - sent)
        elif result[1] is _OTHER_NODE:
            result = (False, None)  # someone else lives there now: no dead mark
        elif not self._closed:
            self._mark_dead(node)
        return self.handle_call_response(result, node)

    def patience(self) -> float:
        """How long a lookup waits for one answer before asking someone else meanwhile:
        a few times the median of recent round-trip times, within [50 ms, rpc_timeout].

        Too short only costs an extra RPC (a straggler's late answer is still used); too
        long makes every dead contact cost that long.
        """
        if not self._hedge:
            return math.inf
        if len(self._rtts) < _MIN_RTT_SAMPLES:
            return float(self._wait_timeout)
        median = sorted(self._rtts)[len(self._rtts) // 2]
        return float(min(self._wait_timeout, max(_MIN_PATIENCE, _PATIENCE_FACTOR * median)))

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "find_node", node_to_find.id)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "find_value", node_to_find.id)

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "ping")

    async def call_store(self, node_to_ask: Node, key: bytes, value: bytes) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "store", key, value)

    async def send_record(self, node: Node, key: bytes, chunks: Sequence[bytes]) -> bool:
        """Store every chunk at ``node``; True if it took them all."""
        for chunk in chunks:
            ok, accepted = await self.call_store(node, key, chunk)
            if not (ok and accepted is True):
                return False
        self._stats.repairs += 1
        return True

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        # kademlia's, without a warning per timeout: under churn that floods the log.
        if not result[0]:
            self._forget_contact(node)
        else:
            self.welcome_if_new(node)
        return result

    def _forget_contact(self, node: Node) -> None:
        """Take ``node`` out of the routing table, unless the table holds its id at another
        address: a made-up contact (a real id at a wrong address, listed by a peer) must
        not evict the real one (kademlia removes by id)."""
        index = self.router.get_bucket_for(node)
        if index is None:  # kademlia's get_bucket_for misses the very last id
            return
        held = self.router.buckets[index][node.id]
        if held is None or (held.ip, held.port) == (node.ip, node.port):
            self.router.remove_contact(node)

    def parse_nodes(self, payload: object) -> list[Node]:
        """The valid, not-ourselves nodes of a find_node answer (known-dead ones too: the
        lookup decides about those)."""
        if not isinstance(payload, list):
            return []
        nodes = []
        for entry in payload[:_MAX_NODES_IN_ANSWER]:
            if not (isinstance(entry, list | tuple) and len(entry) == 3):
                continue
            node_id, ip, port = entry
            if not is_node_id(node_id) or node_id == self.source_node.id:
                continue
            if type(port) is not int or not 0 < port < 65536 or not isinstance(ip, str):
                continue
            try:  # never a hostname: sendto would resolve it, blocking the event loop
                version = ipaddress.ip_address(ip).version
            except ValueError:
                continue
            if version != (6 if self._family == socket.AF_INET6 else 4):
                continue
            nodes.append(Node(node_id, ip, port))
        return nodes

    # -- membership --------------------------------------------------------------------

    def welcome_if_new(self, node: Node) -> None:
        """Add ``node`` to the routing table; if new, send it the records it should hold.

        kademlia 2.2.3 computes ``digest(key)`` here although stored keys already are
        digests, so it compared distances to the wrong point. Paper §2.5: we send a record
        when the new node is among the k closest to its key and we are the closest.
        """
        if self._closed or node.id == self.source_node.id or not self.router.is_new_node(node):
            return
        log.debug("new contact %s", node)
        # A node in a full bucket stays "new" (it waits in the replacement cache), so
        # remember whom we replicated to: one scan of the store per node per dead_ttl.
        now = asyncio.get_running_loop().time()
        if now - self._welcomed.get(node.id, -math.inf) >= self._dead_ttl:
            self._welcomed[node.id] = now
            self._spawn(self._replicate_to(node))
        self.router.add_contact(node)

    async def _replicate_to(self, node: Node) -> None:
        try:
            async for key, bindings in self._store.items(self._clock()):
                keynode = Node(key)  # the key is the digest already
                neighbors = self.router.find_neighbors(keynode, exclude=node)
                if neighbors:
                    farthest = neighbors[-1].distance_to(keynode)
                    new_close = len(neighbors) < self.router.ksize or (
                        node.distance_to(keynode) < farthest
                    )
                    nearest = neighbors[0].distance_to(keynode)
                    we_closest = self.source_node.distance_to(keynode) < nearest
                    if not (new_close and we_closest):
                        continue
                await self.send_record(node, key, record_chunks(bindings))
        except RecordStoreError as exc:
            log.warning("cannot replicate to %s: %s", node, exc)

    def prune(self) -> None:
        """Forget dead marks and replication times older than ``dead_ttl``; log the
        refused datagrams not logged yet."""
        now = self._now()
        horizon = now - self._dead_ttl
        self._dead = {a: entry for a, entry in self._dead.items() if entry[0] >= horizon}
        self._welcomed = {n: since for n, since in self._welcomed.items() if since >= horizon}
        line = self._refusals.flush(now)
        if line is not None:
            log.warning("%s", line)

    def shutdown(self) -> None:
        """Stop answering; every RPC still waiting fails now instead of at its timeout."""
        self._closed = True
        for future, timer in self._outstanding.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        self._expect.clear()

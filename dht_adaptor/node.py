"""A Kademlia DHT node holding signed, merged binding records: the only kademlia importer.

kademlia 2.2.3 gives us routing, node lookups and the UDP RPC layer; this module replaces
what does not fit a location service (see the project's STYLE.md for the measured limits):

* **Values merge instead of overwriting.** ``rpc_store`` hands the bytes to a
  :class:`~dht_adaptor.record_store.RecordStore`, which verifies every binding and merges
  it into what it holds. ``get`` crawls to *all* of the k closest nodes, verifies each
  answer and merges them (kademlia stops at the first value and takes the most common one,
  so a node holding one site's bindings would hide the other site's).
* **Typed failures.** ``put``/``get`` raise :class:`DhtUnavailable`, :class:`DhtRejected`,
  :class:`InvalidBindings` or ``record.RecordTooLarge`` instead of returning None/False.
* **Dead nodes cost little.** The RPC timeout is configurable (kademlia waits 5 s), a
  timed-out address is skipped by our own lookups for ``dead_ttl`` seconds (any datagram
  from it clears that at once), and it leaves the routing table (kademlia already does).
* **Robust to bad peers.** Undecodable datagrams, unknown RPCs, wrong argument counts or
  types, node lists with hostnames or bad ids are dropped and logged at debug level; they
  never raise inside a task or send a traceback to the log.
* **welcome_if_new** no longer re-digests keys that already are digests (kademlia
  computes ``digest(key)`` of the 20-byte key, so it picked the wrong nodes to replicate
  to); replication to a new close node goes through the same merge.
* **Republishing and read repair.** Every ``republish_interval`` the node re-stores what
  it holds at the current k closest nodes; after a ``get`` the closest nodes that lacked
  part of the merged record are sent it. Both are safe because merge is idempotent.

A record larger than one store RPC (several sites' bindings merged) is replicated in
chunks: any subset of a record merges in like the whole.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import math
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import umsgpack
from kademlia.network import Server
from kademlia.node import Node, NodeHeap
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage

from dht_adaptor.keys import TrustStore
from dht_adaptor.record import (
    DhtBinding,
    RecordError,
    RecordTooLarge,
    decode_record,
    dht_key,
    encode_record,
    live,
    merge,
)
from dht_adaptor.record_store import MAX_HELD_BYTES, RecordStore, RecordStoreError

__all__ = [
    "DhtError",
    "DhtNode",
    "DhtRejected",
    "DhtUnavailable",
    "InvalidBindings",
    "RecordTooLarge",
]

log = logging.getLogger(__name__)

DEFAULT_RPC_TIMEOUT = 0.5  # seconds; kademlia's 5 s made every dead contact cost 5 s
DEFAULT_REPUBLISH_INTERVAL = 600.0
DEFAULT_SWEEP_INTERVAL = 60.0
DEFAULT_DEAD_TTL = 30.0
_ID_BYTES = 20
_MAX_NODES_IN_ANSWER = 64  # a find_node answer holds k nodes; more is a peer misbehaving
_UNPACK_ERRORS = (umsgpack.UnpackException, ValueError, OverflowError, RecursionError, struct.error)
_RPC_NAMES = frozenset({"ping", "stun", "store", "find_node", "find_value"})

_MIN_PATIENCE = 0.05  # seconds; see _Protocol.patience
_PATIENCE_FACTOR = 3.0
_RTT_SAMPLES = 64
_MIN_RTT_SAMPLES = 8

Address = tuple[str, int]
Bindings = tuple[DhtBinding, ...]
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any] | None"]


class DhtError(Exception):
    """The DHT could not do what was asked (the proxy answers 5xx)."""


class DhtUnavailable(DhtError):
    """No peers are known, or none of the nodes asked answered."""


class DhtRejected(DhtError):
    """Nodes answered, but every one of them refused the record."""


class InvalidBindings(DhtError, ValueError):
    """``put`` was given bindings of another AOR, or ones our trust store cannot verify."""


@dataclass(slots=True)
class Latency:
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
    put_latency: Latency = field(default_factory=Latency)
    get_latency: Latency = field(default_factory=Latency)


class _BadRequest(Exception):
    """A request we do not answer (wrong argument types); logged at debug."""


def _is_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == _ID_BYTES


def _checked_id(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != _ID_BYTES:
        raise _BadRequest(f"{what} is not {_ID_BYTES} bytes")
    return value


def _chunks(bindings: Bindings) -> list[bytes]:
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
        return _chunks(bindings[:half]) + _chunks(bindings[half:])


def _versions(bindings: Bindings) -> set[tuple[tuple[str, str, str], int]]:
    return {(b.identity, b.version) for b in bindings}


class _NoStorage(IStorage):  # type: ignore[misc]
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


class _Protocol(KademliaProtocol):  # type: ignore[misc]
    """kademlia's protocol with merged, verified values and defensive request handling."""

    def __init__(
        self,
        source_node: Node,
        ksize: int,
        *,
        store: RecordStore,
        clock: Callable[[], float],
        stats: DhtStats,
        spawn: Spawn,
        rpc_timeout: float,
        dead_ttl: float,
        hedge: bool,
    ) -> None:
        super().__init__(source_node, _NoStorage(), ksize)
        self._wait_timeout = rpc_timeout  # rpcudp's per-RPC timeout
        self._store = store
        self._clock = clock
        self._stats = stats
        self._spawn = spawn
        self._dead_ttl = dead_ttl
        self._dead: dict[Address, float] = {}  # address -> loop time it timed out
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
        self._dead.pop((addr[0], addr[1]), None)  # it is alive after all
        if not self._closed:
            self._spawn(self._solve_datagram(data, addr))

    async def _solve_datagram(self, datagram: bytes, address: Any) -> None:
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
            await self._accept_request(msg_id, data, address)
        elif datagram[:1] == b"\x01":
            self._accept_response(msg_id, data, address)
        else:
            log.debug("datagram of unknown kind from %s ignored", address)

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
            self.transport.sendto(b"\x01" + msg_id + umsgpack.packb(response), address)

    def _timeout(self, msg_id: bytes) -> None:
        self._stats.rpc_timeouts += 1
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

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

    def live_neighbors(self, target: Node) -> list[Node]:
        """The k closest contacts to ``target`` in the routing table, known-dead ones left out."""
        return [n for n in self.router.find_neighbors(target) if not self.is_dead((n.ip, n.port))]

    def is_dead(self, address: Address) -> bool:
        since = self._dead.get(address)
        if since is None:
            return False
        if asyncio.get_running_loop().time() - since < self._dead_ttl:
            return True
        del self._dead[address]
        return False

    async def _call(self, node: Node, rpc: str, *args: Any) -> tuple[bool, Any]:
        address = (node.ip, node.port)
        if self._closed:
            return (False, None)
        if self.is_dead(address):
            self.router.remove_contact(node)
            return (False, None)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        result: tuple[bool, Any] = await getattr(self, rpc)(address, self.source_node.id, *args)
        if result[0]:
            self._rtts.append(loop.time() - sent)
        elif not self._closed:
            self._dead[address] = loop.time()
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
            self.router.remove_contact(node)
        else:
            self.welcome_if_new(node)
        return result

    def parse_nodes(self, payload: object) -> list[Node]:
        """The valid, not-ourselves, not-known-dead nodes of a find_node answer."""
        if not isinstance(payload, list):
            return []
        nodes = []
        for entry in payload[:_MAX_NODES_IN_ANSWER]:
            if not (isinstance(entry, list | tuple) and len(entry) == 3):
                continue
            node_id, ip, port = entry
            if not _is_id(node_id) or node_id == self.source_node.id:
                continue
            if type(port) is not int or not 0 < port < 65536 or not isinstance(ip, str):
                continue
            try:  # never a hostname: sendto would resolve it, blocking the event loop
                version = ipaddress.ip_address(ip).version
            except ValueError:
                continue
            if version != (6 if self._family == socket.AF_INET6 else 4):
                continue
            if not self.is_dead((ip, port)):
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
                await self.send_record(node, key, _chunks(bindings))
        except RecordStoreError as exc:
            log.warning("cannot replicate to %s: %s", node, exc)

    def prune(self) -> None:
        """Forget dead marks and replication times older than ``dead_ttl``."""
        horizon = asyncio.get_running_loop().time() - self._dead_ttl
        self._dead = {a: since for a, since in self._dead.items() if since >= horizon}
        self._welcomed = {n: since for n, since in self._welcomed.items() if since >= horizon}

    def shutdown(self) -> None:
        """Stop answering; every RPC still waiting fails now instead of at its timeout."""
        self._closed = True
        for future, timer in self._outstanding.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()


class _Lookup:
    """An iterative lookup keeping ``alpha`` RPCs in flight (Kademlia paper §2.3).

    kademlia's SpiderCrawl works in rounds of alpha RPCs and waits for the slowest, so a
    dead contact stalls the round for a full timeout. Here a slow contact holds one slot
    for at most ``protocol.patience()`` (a few round-trip times): then it is set aside as
    a straggler, and the next candidate is asked. A straggler that answers before the
    lookup ends is taken back; one that times out is evicted as usual, in the background.

    The lookup ends when each of the k closest nodes heard of has answered or been set
    aside. A find_value lookup does not stop at the first value: every value is kept
    (records merge), in ``values`` by node id, still untrusted.
    """

    def __init__(
        self,
        protocol: _Protocol,
        target: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        spawn: Spawn,
    ) -> None:
        self._protocol = protocol
        self._target = target
        self._alpha = alpha
        self._spawn = spawn
        self.nearest = NodeHeap(target, ksize)
        self.nearest.push(peers)
        # Failed nodes and stragglers, kept out of ``nearest`` even when later answers list
        # them again (kademlia's NodeHeap would take them back, already "contacted", and
        # return dead nodes as the closest: a put then waited for their timeouts).
        self._out: set[bytes] = set()
        self.answered = 0
        self.values: dict[bytes, object] = {}

    async def run(self, *, find_value: bool = False) -> list[Node]:
        """The k closest nodes that answered, nearest first."""
        call = self._protocol.call_find_value if find_value else self._protocol.call_find_node
        loop = asyncio.get_running_loop()
        pending: dict[asyncio.Task[tuple[bool, Any]], tuple[Node, float]] = {}
        active: set[asyncio.Task[tuple[bool, Any]]] = set()  # pending, not stragglers
        while True:
            patience = self._protocol.patience()  # adapts as answers come in
            for peer in self.nearest.get_uncontacted()[: self._alpha - len(active)]:
                self.nearest.mark_contacted(peer)
                task = self._spawn(call(peer, self._target))
                if task is None:  # the node is closing
                    return list(self.nearest)
                pending[task] = (peer, loop.time())
                active.add(task)
            if not active:
                if self.answered or not pending:
                    # Stragglers still pending finish in the background (tracked by the
                    # node), so that dead ones get evicted.
                    return list(self.nearest)
                timeout = None  # nobody answered yet: wait for the stragglers after all
            elif math.isinf(patience):
                timeout = None
            else:
                first = min(pending[t][1] for t in active)
                timeout = max(0.0, first + patience - loop.time())
            done, _ = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                peer, _ = pending.pop(task)
                active.discard(task)
                failed = task.cancelled() or task.exception() is not None  # (logged)
                ok, payload = (False, None) if failed else task.result()
                if not ok:
                    self._set_aside(peer)
                    continue
                if peer.id in self._out:  # a straggler after all
                    self._out.discard(peer.id)
                    self.nearest.push(peer)
                if isinstance(payload, dict) and find_value:
                    self.answered += 1
                    self.values[peer.id] = payload.get("value")
                else:
                    self.answered += 1
                    nodes = self._protocol.parse_nodes(payload)
                    self.nearest.push([n for n in nodes if n.id not in self._out])
            now = loop.time()
            for task in [t for t in active if now - pending[t][1] >= patience]:
                active.discard(task)
                self._set_aside(pending[task][0])

    def _set_aside(self, peer: Node) -> None:
        self._out.add(peer.id)
        self.nearest.remove([peer.id])


class _Server(Server):  # type: ignore[misc]
    """kademlia's Server with our protocol and tracked background tasks."""

    def __init__(
        self,
        make_protocol: Callable[[Node, int], _Protocol],
        spawn: Spawn,
        *,
        ksize: int,
        alpha: int,
        node_id: bytes | None,
    ) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=_NoStorage())
        self._make_protocol = make_protocol
        self._spawn = spawn

    def _create_protocol(self) -> _Protocol:
        return self._make_protocol(self.node, self.ksize)

    def refresh_table(self, interval: float = 3600) -> None:
        self._spawn(self._refresh_table())
        loop = asyncio.get_running_loop()
        self.refresh_loop = loop.call_later(interval, self.refresh_table, interval)

    async def _refresh_table(self) -> None:
        # Only the bucket refresh; records are republished by DhtNode from the RecordStore.
        crawls = []
        for node_id in self.protocol.get_refresh_ids():
            target = Node(node_id)
            nearest = self.protocol.router.find_neighbors(target, self.alpha)
            crawls.append(
                _Lookup(self.protocol, target, nearest, self.ksize, self.alpha, self._spawn).run()
            )
        await asyncio.gather(*crawls)


class DhtNode:
    """One DHT node: a kademlia server whose values are verified, merged binding records."""

    def __init__(
        self,
        store: RecordStore,
        trust: TrustStore,
        *,
        ksize: int = 20,
        alpha: int = 3,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
        clock: Callable[[], float] = time.time,
        node_id: bytes | None = None,
        republish_interval: float = DEFAULT_REPUBLISH_INTERVAL,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
        dead_ttl: float = DEFAULT_DEAD_TTL,
        hedge: bool = True,
    ) -> None:
        """``store`` stays the caller's: :meth:`close` does not close it.

        ``rpc_timeout`` is when an RPC fails and its node is evicted; with ``hedge`` a
        lookup asks the next node after a few round-trip times meanwhile (see _Lookup).
        """
        if ksize < 1 or alpha < 1:
            raise ValueError(f"ksize and alpha must be positive, not {ksize} and {alpha}")
        for name, value in (
            ("rpc_timeout", rpc_timeout),
            ("republish_interval", republish_interval),
            ("sweep_interval", sweep_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if dead_ttl < 0:
            raise ValueError(f"dead_ttl must not be negative, not {dead_ttl}")
        if node_id is not None and not _is_id(node_id):
            raise ValueError("node_id must be 20 bytes")
        self._store = store
        self._trust = trust
        self._ksize = ksize
        self._alpha = alpha
        self._clock = clock
        self._rpc_timeout = rpc_timeout
        self._dead_ttl = dead_ttl
        self._hedge = hedge
        self._republish_interval = republish_interval
        self._sweep_interval = sweep_interval
        self._counters = DhtStats()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._had_peers = False
        self._address: Address | None = None
        self._server = _Server(
            self._make_protocol, self._spawn, ksize=ksize, alpha=alpha, node_id=node_id
        )

    def __repr__(self) -> str:
        return f"DhtNode({self.node_id_hex[:12]}…, {self._address})"

    def _make_protocol(self, source_node: Node, ksize: int) -> _Protocol:
        return _Protocol(
            source_node,
            ksize,
            store=self._store,
            clock=self._clock,
            stats=self._counters,
            spawn=self._spawn,
            rpc_timeout=self._rpc_timeout,
            dead_ttl=self._dead_ttl,
            hedge=self._hedge,
        )

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        if self._closed:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("DHT background task failed: %r", task.exception())

    @property
    def _protocol(self) -> _Protocol:
        protocol = self._server.protocol
        if protocol is None or self._closed:
            raise DhtUnavailable("the DHT node is not listening")
        return protocol  # type: ignore[no-any-return]

    # -- identity and membership -------------------------------------------------------

    @property
    def store(self) -> RecordStore:
        """The record store this node serves from (the caller's to close)."""
        return self._store

    @property
    def node_id(self) -> bytes:
        return bytes(self._server.node.id)

    @property
    def node_id_hex(self) -> str:
        return self.node_id.hex()

    @property
    def address(self) -> Address:
        """(host, port) this node listens on; only after :meth:`listen`."""
        if self._address is None:
            raise DhtUnavailable("the DHT node is not listening")
        return self._address

    async def listen(self, host: str = "0.0.0.0", port: int = 0) -> int:
        """Bind the UDP socket (port 0: any free port); returns the port bound."""
        if self._server.protocol is not None or self._closed:
            raise RuntimeError("listen() may be called once")
        await self._server.listen(port, interface=host)
        sockname = self._server.transport.get_extra_info("sockname")
        self._address = (host, int(sockname[1]))
        self._spawn(self._every(self._republish_interval, self.republish))
        self._spawn(self._every(self._sweep_interval, self._sweep))
        return self._address[1]

    async def ping(self, addr: tuple[str, int]) -> bool:
        """Does a DHT node answer at ``addr`` (hostnames resolved)? Joins nothing."""
        resolved = await self._resolve(*addr)
        if resolved is None:
            return False
        ok, node_id = await self._protocol.ping(resolved, self.node_id)
        return bool(ok) and _is_id(node_id)

    async def bootstrap(self, addrs: Sequence[tuple[str, int]]) -> int:
        """Join via known nodes (hostnames are resolved); returns how many peers we know."""
        protocol = self._protocol
        resolved = await asyncio.gather(*(self._resolve(host, port) for host, port in addrs))
        pings = [protocol.ping(a, self.node_id) for a in resolved if a is not None]
        seeds = []
        for address, (ok, node_id) in zip(
            [a for a in resolved if a is not None], await asyncio.gather(*pings), strict=True
        ):
            if ok and _is_id(node_id) and node_id != self.node_id:
                seed = Node(node_id, address[0], address[1])
                protocol.welcome_if_new(seed)
                seeds.append(seed)
        if seeds:
            await _Lookup(
                protocol, self._server.node, seeds, self._ksize, self._alpha, self._spawn
            ).run()
        return len(self.peers())

    async def _resolve(self, host: str, port: int) -> Address | None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=self._protocol._family, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            log.warning("cannot resolve DHT bootstrap node %s:%s: %s", host, port, exc)
            return None
        if not infos:
            return None
        sockaddr = infos[0][4]
        return (str(sockaddr[0]), int(sockaddr[1]))

    def peers(self) -> list[tuple[str, str, int]]:
        """(node id hex, host, port) of every node in the routing table."""
        protocol = self._server.protocol
        if protocol is None:
            return []
        found = [
            (bytes(n.id).hex(), n.ip, n.port)
            for bucket in protocol.router.buckets
            for n in bucket.get_nodes()
        ]
        self._had_peers = self._had_peers or bool(found)
        return found

    def _alone(self) -> bool:
        """True while this node has never known a peer: it is the whole overlay."""
        return not self.peers() and not self._had_peers

    async def _closest(self, target: Node) -> list[Node]:
        protocol = self._protocol
        peers = protocol.live_neighbors(target)
        if not peers:
            return []
        return await _Lookup(protocol, target, peers, self._ksize, self._alpha, self._spawn).run()

    def _we_are_close(self, target: Node, nodes: list[Node]) -> bool:
        if len(nodes) < self._ksize:
            return True
        own = self._server.node.distance_to(target)
        return bool(own < max(n.distance_to(target) for n in nodes))

    # -- put and get -------------------------------------------------------------------

    async def put(self, aor: str, bindings: Sequence[DhtBinding]) -> int:
        """Store our bindings of ``aor`` at the k closest nodes; returns how many took them.

        Raises InvalidBindings, RecordTooLarge (before sending anything), DhtUnavailable
        (no peers, or no node answered; a local copy, if this node is among the closest,
        is kept and republished) or DhtRejected.
        """
        started = time.perf_counter()
        try:
            accepted = await self._put(aor, tuple(bindings))
        except (DhtError, RecordError):
            self._counters.puts_failed += 1
            raise
        finally:
            self._counters.put_latency.add(time.perf_counter() - started)
        self._counters.puts_ok += 1
        return accepted

    async def _put(self, aor: str, bindings: Bindings) -> int:
        key = dht_key(aor)
        if not bindings:
            raise InvalidBindings(f"no bindings to put for {aor!r}")
        if any(b.aor != aor for b in bindings):
            raise InvalidBindings(f"bindings of another AOR than {aor!r}")
        _, unverified = self._trust.filter(bindings)
        if unverified:
            raise InvalidBindings(f"{unverified} binding(s) of {aor!r} fail verification")
        value = encode_record(bindings)
        target = Node(key)
        nodes = await self._closest(target)
        if not nodes and self._alone():
            # A node that never knew a peer is the whole overlay (a lone site, the first
            # node before others join): it is the closest node, so it keeps the record,
            # and republishes it to closer nodes once they join.
            if (await self._store.merge_in(key, value, self._clock())).ok:
                return 1
            raise DhtRejected(f"the local store refused the record of {aor!r}")
        if not nodes:
            raise DhtUnavailable(f"no DHT peer answered to store {aor!r}")
        local = self._we_are_close(target, nodes)
        protocol = self._protocol
        remote = asyncio.gather(*(protocol.call_store(n, key, value) for n in nodes))
        results = await remote
        accepted = sum(1 for ok, answer in results if ok and answer is True)
        answered = sum(1 for ok, _ in results if ok)
        if local:
            try:
                if (await self._store.merge_in(key, value, self._clock())).ok:
                    accepted += 1
            except RecordStoreError as exc:
                log.warning("cannot store %s locally: %s", aor, exc)
        if not answered:
            raise DhtUnavailable(f"none of {len(nodes)} DHT nodes answered for {aor!r}")
        if not accepted:
            raise DhtRejected(f"{answered} DHT node(s) refused the record of {aor!r}")
        log.debug("put %s: %d of %d nodes took it (local: %s)", aor, accepted, len(nodes), local)
        return accepted

    async def get(self, aor: str) -> Bindings:
        """The live, verified bindings of ``aor`` merged from every close node that answers.

        Returns () when nobody has any; raises DhtUnavailable only when no node answered
        and the local store holds nothing for the key.
        """
        started = time.perf_counter()
        try:
            result = await self._get(aor)
        except DhtError:
            self._counters.gets_failed += 1
            raise
        finally:
            self._counters.get_latency.add(time.perf_counter() - started)
        self._counters.gets_ok += 1
        return result

    async def _get(self, aor: str) -> Bindings:
        key = dht_key(aor)
        now = self._clock()
        try:
            local = self._verified(key, await self._store.get(key, now))
        except RecordStoreError as exc:
            log.warning("cannot read %s locally: %s", aor, exc)
            local = ()
        target = Node(key)
        protocol = self._protocol
        peers = protocol.live_neighbors(target)
        found: dict[bytes, Bindings] = {}
        closest: list[Node] = []
        answered = 0
        if peers:
            lookup = _Lookup(protocol, target, peers, self._ksize, self._alpha, self._spawn)
            closest = await lookup.run(find_value=True)
            answered = lookup.answered
            found = {nid: self._admit_answer(key, v) for nid, v in lookup.values.items()}
        if not answered and not local and not (not peers and self._alone()):
            # (A node that never knew a peer is the whole overlay: "none" is the answer.)
            raise DhtUnavailable(f"no DHT node answered for {aor!r}")
        merged = merge(local, *found.values(), now=now)
        if merged:
            self._spawn(self._repair(key, merged, closest, found, local, target))
        return live(merged, now)

    def _verified(self, key: bytes, bindings: Bindings) -> Bindings:
        own = tuple(b for b in bindings if dht_key(b.aor) == key)
        verified, rejected = self._trust.filter(own)
        self._counters.rejected_on_get += rejected + len(bindings) - len(own)
        return tuple(verified)

    def _admit_answer(self, key: bytes, value: object) -> Bindings:
        """The verified bindings of one find_value answer (untrusted)."""
        if not isinstance(value, bytes):
            self._counters.rejected_on_get += 1
            return ()
        try:
            bindings = decode_record(value, max_bytes=MAX_HELD_BYTES)
        except RecordError as exc:
            log.debug("unreadable find_value answer for key %s: %s", key.hex(), exc)
            self._counters.rejected_on_get += 1
            return ()
        return self._verified(key, bindings)

    async def _repair(
        self,
        key: bytes,
        merged: Bindings,
        closest: list[Node],
        found: dict[bytes, Bindings],
        local: Bindings,
        target: Node,
    ) -> None:
        """Read repair: send the merged record to the closest nodes that lacked part of it."""
        want = _versions(merged)
        chunks = _chunks(merged)
        protocol = self._protocol
        stale = [n for n in closest if not want <= _versions(found.get(n.id, ()))]
        if stale:
            await asyncio.gather(*(protocol.send_record(n, key, chunks) for n in stale))
        if not want <= _versions(local) and self._we_are_close(target, closest):
            await self._merge_locally(key, chunks)

    async def _merge_locally(self, key: bytes, chunks: Sequence[bytes]) -> None:
        try:
            for chunk in chunks:
                await self._store.merge_in(key, chunk, self._clock())
        except RecordStoreError as exc:
            log.warning("cannot store key %s locally: %s", key.hex(), exc)

    # -- maintenance -------------------------------------------------------------------

    async def republish(self) -> int:
        """Re-store every held record at the current k closest nodes; returns stores made."""
        protocol = self._protocol
        sent = 0
        async for key, bindings in self._store.items(self._clock()):
            nodes = await self._closest(Node(key))
            chunks = _chunks(bindings)
            results = await asyncio.gather(*(protocol.send_record(n, key, chunks) for n in nodes))
            sent += sum(results)
        return sent

    async def _sweep(self) -> int:
        self._protocol.prune()
        return await self._store.sweep(self._clock())

    async def _every(self, interval: float, job: Callable[[], Coroutine[Any, Any, int]]) -> None:
        while True:
            # Jitter, so that nodes started together do not republish in lockstep.
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            try:
                await job()
            except (DhtError, RecordStoreError, RecordError) as exc:
                log.warning("DHT maintenance failed: %s", exc)

    async def stored_count(self) -> int:
        """How many keys this node's store holds."""
        return await self._store.count()

    def stats(self) -> dict[str, float]:
        """A snapshot of the counters, with the store's accepted/rejected and latencies."""
        c = self._counters
        return {
            "puts_ok": c.puts_ok,
            "puts_failed": c.puts_failed,
            "gets_ok": c.gets_ok,
            "gets_failed": c.gets_failed,
            "rejected": self._store.rejected,
            "accepted": self._store.accepted,
            "rejected_on_get": c.rejected_on_get,
            "rpc_timeouts": c.rpc_timeouts,
            "repairs": c.repairs,
            "put_latency_last": c.put_latency.last,
            "put_latency_total": c.put_latency.total,
            "put_latency_max": c.put_latency.max,
            "get_latency_last": c.get_latency.last,
            "get_latency_total": c.get_latency.total,
            "get_latency_max": c.get_latency.max,
            "peers": len(self.peers()),
        }

    async def close(self) -> None:
        """Stop the node (idempotent): close the socket, end background tasks."""
        if self._closed:
            return
        protocol = self._server.protocol
        if protocol is not None:
            protocol.shutdown()
        self._closed = True
        self._server.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

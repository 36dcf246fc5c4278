"""The kademlia/rpcudp protocol of a DHT node: RPC handlers, calls and membership.

:class:`NodeProtocol` subclasses kademlia 2.2.3's ``KademliaProtocol`` (itself rpcudp
5.0.1's ``RPCProtocol``) and overrides private internals of both, which is why
``pyproject.toml`` pins their exact versions and ``tests/dht/test_engine_contract.py``
checks every name used here. The datagram side (sessions, requests, answers, timeouts,
loop lag) is :class:`~dht_adaptor.endpoint.Endpoint`; here:

* **Merged, verified values.** ``rpc_store`` hands the bytes to a
  :class:`~dht_adaptor.record_store.RecordStore`, which verifies every binding and merges
  it into what it holds; ``rpc_find_value`` answers from that store.
* **A timeout marks, a confirmation evicts.** A real timeout (not one our own loop lag
  caused) marks the node dead at once (lookups skip it), and a ping with a longer
  timeout confirms it before it leaves the routing table (SWIM's idea): under overload
  a node keeps its peers.
* **Dead stays dead until heard from** (:mod:`dht_adaptor.contacts`): not re-learnt from
  others' answers, left out of ours, kept out of the replacement cache; probed now and
  then, so a node that comes back is found. The dead contacts are remembered, so that a
  lookup that found no value while it skipped some can ask them once more
  (:meth:`NodeProtocol.dead_near`): after a partition heals, the far side is asked.
* **Replication that costs what it moves** (:mod:`dht_adaptor.keyspace`): a new contact
  is sent the records for which it is now among the k closest, looking only at the keys
  in its id range. It is first *offered* them (replica sync, the idea of RFC 6940
  §6.4.1.2): one ``offer`` RPC names up to :data:`MAX_OFFER` keys with a digest of what
  we hold for each, the contact answers which it lacks or holds differently, and only
  those records are sent. A contact evicted after a timeout and met again (it holds
  everything already) costs an offer, not a resend of every record. A contact that only
  asked (a lookup client) waits ``welcome_delay``; a replacement-cache entry gets nothing.
* **Robust to bad peers.** Undecodable datagrams, unknown RPCs, wrong argument counts or
  types, node lists with hostnames or bad ids are dropped and logged at debug level; they
  never raise inside a task or send a traceback to the log.
* **welcome_if_new** no longer re-digests keys that already are digests (kademlia
  computes ``digest(key)`` of the 20-byte key, so it picked the wrong nodes to replicate
  to).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable
from kademlia.storage import IStorage

from dht_adaptor.contacts import DeadContacts
from dht_adaptor.endpoint import BUSY, LAGGED, OTHER_NODE, BadRequest, Endpoint, Spawn
from dht_adaptor.keys import TrustStore
from dht_adaptor.keyspace import ID_BITS, KeyIndex, block_bits, hole_bits
from dht_adaptor.membership import Member
from dht_adaptor.record import DIGEST_BYTES, DhtBinding, RecordError, encode_record, held_digest
from dht_adaptor.record_store import MAX_HELD_BYTES, RecordStore, RecordStoreError
from dht_adaptor.session import Sessions
from dht_adaptor.stats import DhtStats, Latency
from dht_adaptor.wire import (
    MAX_NODES_IN_ANSWER,
    MAX_OFFER,
    RPC_NAMES,
    UNPACK_ERRORS,
    is_node_id,
    record_chunks,
    valid_ip,
)

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

_RPC_NAMES = RPC_NAMES  # (names the contract test reads)
_UNPACK_ERRORS = UNPACK_ERRORS

_MIN_PATIENCE = 0.05  # seconds; see NodeProtocol.patience
_PATIENCE_FACTOR = 3.0
_RTT_SAMPLES = 64
_MIN_RTT_SAMPLES = 8
DEFAULT_WELCOME_DELAY = 2.0  # seconds before a contact that only asked is replicated to
DEFAULT_MAX_REQUESTS = 256  # async request handlers at once
_MAX_PENDING_WELCOMES = 1024
_WELCOMES_PER_TICK = 16
_PROBES_PER_TICK = 4

Address = tuple[str, int]
Bindings = tuple[DhtBinding, ...]


def _checked_id(value: object, what: str) -> bytes:
    if not is_node_id(value):
        raise BadRequest(f"{what} is not 20 bytes")
    return value  # type: ignore[return-value]


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


class Table(RoutingTable):  # type: ignore[misc]
    """kademlia's routing table, with a find_neighbors that sees every bucket.

    kademlia 2.2.3's TableTraverser alternates left and right of the target's bucket and
    stops when the side it is due to read is exhausted, even if the other side still has
    buckets: a node whose contacts all lay in buckets left of the target's found none
    and answered "nobody", seen in the simulation as a get failing for a stored user.
    A routing table holds at most a few hundred contacts: reading them all is cheap.
    """

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        k = k or self.ksize
        target = node.long_id
        found = [
            n
            for bucket in self.buckets
            for n in bucket.nodes.values()
            if n.id != node.id and (exclude is None or not n.same_home_as(exclude))
        ]
        return heapq.nsmallest(k, found, key=lambda n: n.long_id ^ target)


class NodeProtocol(Endpoint, KademliaProtocol):  # type: ignore[misc]
    """kademlia's protocol for members only, with merged, verified values, sessions,
    overload tolerance and replication by key range (see the module docstring)."""

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
        welcome_delay: float = DEFAULT_WELCOME_DELAY,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        sessions: bool = True,
    ) -> None:
        if bytes(source_node.id) != member.node_id:
            raise ValueError("the node id is not the one bound to the site key and salt")
        super().__init__(source_node, NoStorage(), ksize)
        self.router = Table(self, ksize, source_node)
        self._wait_timeout = rpc_timeout  # rpcudp's per-RPC timeout
        self._member = member
        self._trust = trust  # asked at every datagram: never copy keys out of it
        self._sessions = Sessions(member, trust)
        self._use_sessions = sessions
        self._store = store
        self._clock = clock
        self._stats = stats
        self._spawn = spawn
        self._dead_ttl = dead_ttl
        self._dead = DeadContacts(probe_after=max(dead_ttl, 1.0))
        self.index = KeyIndex()  # the keys the store holds, by id (replication)
        self._init_endpoint(rpc_timeout, max_requests)
        self._family = socket.AF_INET
        self._hedge = hedge
        self._rtts: deque[float] = deque(maxlen=_RTT_SAMPLES)  # of recent answered RPCs
        self._welcomed: dict[bytes, float] = {}  # node id -> loop time we replicated to it
        self._welcome_delay = welcome_delay
        self._pending: dict[bytes, tuple[float, Node]] = {}  # node id -> (due, contact)
        self._confirming: set[bytes] = set()

    def _alive(self, address: Address) -> None:
        self._dead.clear(address)

    def _answered_by(self, node_id: bytes, address: Address) -> None:
        self._welcome(Node(node_id, address[0], address[1]), served=True)

    @property
    def welcomes_pending(self) -> int:
        return len(self._pending)

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
        if result.held:
            self.index.add(dkey, self._now())
        return result.ok

    def rpc_find_node(self, sender: Any, nodeid: object, key: object) -> list[tuple[Any, ...]]:
        source = self._source(sender, nodeid)
        dkey = _checked_id(key, "key")
        self.welcome_if_new(source)
        return self._neighbors_answer(Node(dkey), source)

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
        return self._neighbors_answer(Node(dkey), source)

    async def rpc_offer(self, sender: Any, nodeid: object, entries: object) -> list[int]:
        """Replica sync: a node about to replicate to us names keys and the digest of what
        it holds under each (:func:`~dht_adaptor.record.held_digest`); we answer the
        positions of those we hold nothing or something else for, and it sends only
        those records.

        Keys for which we know k live nodes closer than ourselves are declined: the
        sender decided from its own view, sparser than ours around our id, and records
        sent on such views spread beyond the k closest nodes (at 1,000 records a node,
        that was most of what replication moved)."""
        source = self._source(sender, nodeid)
        self.welcome_if_new(source)
        if not isinstance(entries, list) or len(entries) > MAX_OFFER:
            raise BadRequest(f"an offer is a list of at most {MAX_OFFER} entries")
        offered = [_offer_entry(entry) for entry in entries]
        now = self._clock()
        others = self._live_ids(exclude=source)
        wanted = []
        for position, (key, digest) in enumerate(offered):
            if not self._among_closest(key, others):
                continue
            try:
                held = await self._store.get(key, now)
            except RecordStoreError:
                held = ()  # ask for it: the store RPC then says whether we can take it
            if not held or held_digest(held) != digest:
                wanted.append(position)
        return wanted

    def _live_ids(self, exclude: Node | None = None) -> list[int]:
        """The ids of the routing table's contacts not known dead (nor ``exclude``)."""
        dead = self._dead
        return [
            n.long_id
            for bucket in self.router.buckets
            for n in bucket.nodes.values()
            if (n.ip, n.port) not in dead and (exclude is None or not n.same_home_as(exclude))
        ]

    def _among_closest(self, key: bytes, others: Sequence[int]) -> bool:
        """Are fewer than k of ``others`` closer to ``key`` than we are?"""
        target = int.from_bytes(key, "big")
        mine = self.source_node.long_id ^ target
        closer = sum(1 for other in others if other ^ target < mine)
        return bool(closer < self.router.ksize)

    def _neighbors_answer(self, target: Node, source: Node) -> list[tuple[Any, ...]]:
        # Known-dead contacts are left out: others must not re-learn them from us.
        found = self.router.find_neighbors(target, k=self.router.ksize * 2, exclude=source)
        # An IPv4 contact of a dual-stack node is told as IPv4 (::ffff: means nothing to
        # an IPv4 node, and nothing reachable to an IPv6-only one).
        alive = [(n.id, _unmapped(n.ip), n.port) for n in found if (n.ip, n.port) not in self._dead]
        return alive[: self.router.ksize]

    # -- calling -----------------------------------------------------------------------

    async def resolve(self, host: str, port: int) -> Address | None:
        """``(ip, port)`` of ``host`` in this socket's address family, or None (logged)."""
        # A dual-stack socket reaches an IPv4 node as ::ffff:a.b.c.d.
        flags = socket.AI_V4MAPPED if self._dual_stack() else 0
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=self._family, type=socket.SOCK_DGRAM, flags=flags
            )
        except OSError as exc:
            log.warning("cannot resolve DHT bootstrap node %s:%s: %s", host, port, exc)
            return None
        if not infos:
            return None
        sockaddr = infos[0][4]
        return (str(sockaddr[0]), int(sockaddr[1]))

    def _dual_stack(self) -> bool:
        """Is ours an IPv6 socket that takes IPv4 too (``::`` without IPV6_V6ONLY)?"""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None or sock.family != socket.AF_INET6:
            return False
        return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)

    def live_neighbors(self, target: Node) -> list[Node]:
        """The k closest contacts to ``target`` in the routing table, known-dead ones left out."""
        found = self.router.find_neighbors(target, k=self.router.ksize * 2)
        return [n for n in found if (n.ip, n.port) not in self._dead][: self.router.ksize]

    def is_dead(self, address: Address) -> bool:
        """Did ``address`` time out (with nothing heard from it since)?"""
        return address in self._dead

    def dead_near(self, target: Node) -> list[Node]:
        """The k known-dead contacts closest to ``target``, nearest first.

        They may be back (a partition healed, say): a lookup that missed records retries
        with them re-admitted (``DhtNode.get``), so they are remembered, not just marked.
        """
        return self._dead.near(target.long_id, self.router.ksize)

    def forget_dead(self, address: Address) -> None:
        """Let calls to ``address`` go out again (it times out again if still dead)."""
        self._dead.clear(address)

    def dead_contacts(self) -> list[Node]:
        return list(self._dead.contacts())

    async def _call(
        self, node: Node, rpc: str, *args: Any, revive: bool = False
    ) -> tuple[bool, Any]:
        """``revive``: ask ``node`` even if it is marked dead. Its mark stays until it
        answers, so that a confirmation under way still evicts it if it stays silent
        (forgetting the mark to ask it made that confirmation keep it, every time)."""
        address = (node.ip, node.port)
        if self._closed or (address in self._dead and not revive):
            return (False, None)
        sent = self._now()
        future = self._request(address, rpc, (self.source_node.id, *args), bytes(node.id))
        ok, answer = await future
        if ok:
            if answer == BUSY:
                self._stats.busy_answers += 1  # alive, but loaded: no mark
                return (False, None)
            self._rtts.append(self._now() - sent)
        elif answer is OTHER_NODE or answer is LAGGED or self._closed:
            return (False, None)  # someone else lives there now, or we were late: no mark
        else:
            self._suspect(node)
            return (False, None)
        return self.handle_call_response((True, answer), node)

    def _suspect(self, node: Node) -> None:
        """A real timeout: lookups skip ``node`` from now on; a slower ping decides
        whether it leaves the routing table."""
        self._dead.mark(node, self._now())
        if node.id not in self._confirming:
            self.spawn_background(self._confirm(node))

    async def _confirm(self, node: Node) -> None:
        """Ping a contact marked dead: it leaves the routing table if it stays silent
        (also when probed long after its mark: a confirmation our own lag spoiled would
        otherwise leave a dead contact in the table for good)."""
        if node.id in self._confirming:
            return
        self._confirming.add(node.id)
        try:
            address = (node.ip, node.port)
            wait = max(4 * self._wait_timeout, 1.0)
            ok, answer = await self._request(address, "ping", (self.source_node.id,), node.id, wait)
            if not ok and answer is None and address in self._dead:
                self._forget_contact(node)  # dead after all: out of the routing table
        finally:
            self._confirming.discard(node.id)

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

    async def call_find_node(
        self, node_to_ask: Node, node_to_find: Node, *, revive: bool = False
    ) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "find_node", node_to_find.id, revive=revive)

    async def call_find_value(
        self, node_to_ask: Node, node_to_find: Node, *, revive: bool = False
    ) -> tuple[bool, Any]:
        return await self._call(node_to_ask, "find_value", node_to_find.id, revive=revive)

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
        # kademlia's, without a warning per timeout and without eviction on the first
        # one (see _suspect): an answer makes the node a contact that serves.
        if result[0]:
            self._welcome(node, served=True)
        return result

    def _forget_contact(self, node: Node) -> None:
        """Take ``node`` out of the routing table, unless the table holds its id at another
        address: a made-up contact (a real id at a wrong address, listed by a peer) must
        not evict the real one (kademlia removes by id). Dead contacts waiting in the
        bucket's replacement cache go first, so that none of them takes its place."""
        index = self.router.get_bucket_for(node)
        if index is None:  # kademlia's get_bucket_for misses the very last id
            return
        bucket = self.router.buckets[index]
        held = bucket[node.id]
        if held is None or (held.ip, held.port) == (node.ip, node.port):
            for waiting_id, waiting in list(bucket.replacement_nodes.items()):
                if (waiting.ip, waiting.port) in self._dead:
                    del bucket.replacement_nodes[waiting_id]
            self.router.remove_contact(node)

    def parse_nodes(self, payload: object) -> list[Node]:
        """The valid, not-ourselves nodes of a find_node answer (known-dead ones too: the
        lookup decides about those)."""
        if not isinstance(payload, list):
            return []
        family = self._family
        dual = self._dual_stack()
        nodes = []
        for entry in payload[:MAX_NODES_IN_ANSWER]:
            if not (isinstance(entry, list | tuple) and len(entry) == 3):
                continue
            node_id, ip, port = entry
            if not is_node_id(node_id) or node_id == self.source_node.id:
                continue
            if type(port) is not int or not 0 < port < 65536:
                continue
            if dual and valid_ip(ip, socket.AF_INET):
                ip = f"::ffff:{ip}"  # an IPv4 node, as our dual-stack socket reaches it
            elif not valid_ip(ip, family):
                continue
            nodes.append(Node(node_id, ip, port))
        return nodes

    # -- new contacts and replication (Kademlia paper §2.5) -------------------------------

    def welcome_if_new(self, node: Node) -> None:
        """A node asked us something: a contact, replicated to later if it serves."""
        self._welcome(node, served=False)

    def _welcome(self, node: Node, *, served: bool) -> None:
        """Add ``node`` to the routing table; if it entered a bucket (not just the
        replacement cache), it gets the records it should hold: at once if it answered
        one of our RPCs (``served``), after ``welcome_delay`` and a ping if it only asked.

        kademlia 2.2.3 computed ``digest(key)`` here although stored keys already are
        digests, and it scanned every stored record for every new contact.
        """
        if self._closed or node.id == self.source_node.id or not self.router.is_new_node(node):
            return
        self.router.add_contact(node)
        if self.router.is_new_node(node):
            return  # waiting in the replacement cache: not a contact yet
        log.debug("new contact %s", node)
        now = self._now()
        if now - self._welcomed.get(node.id, -math.inf) < self._dead_ttl:
            return
        if served:
            self._welcomed[node.id] = now
            self.spawn_background(self._replicate_to(node, only_asked=False))
        elif len(self._pending) < _MAX_PENDING_WELCOMES:
            self._pending.setdefault(node.id, (now + self._welcome_delay, node))

    def maintain(self) -> None:
        """Called every fraction of a second by the node: replicate to the contacts whose
        welcome delay is over, and probe a few contacts marked dead long ago."""
        if self._closed:
            return
        now = self._now()
        due = [(i, n) for i, (t, n) in self._pending.items() if t <= now][:_WELCOMES_PER_TICK]
        for node_id, node in due:
            del self._pending[node_id]
            if self.router.is_new_node(node) or (node.ip, node.port) in self._dead:
                continue  # gone meanwhile (a lookup client that closed, say)
            if now - self._welcomed.get(node_id, -math.inf) >= self._dead_ttl:
                self._welcomed[node_id] = now
                self.spawn_background(self._replicate_to(node, only_asked=True))
        for node in self._dead.to_probe(now, _PROBES_PER_TICK):
            self.spawn_background(self._confirm(node))

    def keys_for(self, node: Node) -> list[bytes]:
        """The indexed keys ``node`` should now be sent by us: it is among the k closest
        nodes we know of to the key, and we are the closest. Looks only at the keys in
        the id block around ``node`` that its k-th closest known node spans, less those
        near us that it cannot need (:mod:`dht_adaptor.keyspace`); counts them in
        ``replication_examined``."""
        ksize = self.router.ksize
        me = self.source_node
        around = self.router.find_neighbors(node, k=ksize, exclude=node)
        distances = sorted([n.distance_to(node) for n in around] + [me.distance_to(node)])
        bits = ID_BITS if len(distances) <= ksize else block_bits(distances[ksize - 1])
        mine = self.router.find_neighbors(me, k=ksize, exclude=node)
        hole = -1
        if len(mine) >= ksize:
            rho = max(n.distance_to(me) for n in mine)
            hole = hole_bits(me.distance_to(node), rho)
        candidates = self.index.in_block(node.id, bits, me.id, hole)
        # Per key, the k closest live contacts other than the newcomer: distances from
        # one list of ids (the table's find_neighbors, called per key, cost 80 µs each).
        others = self._live_ids(exclude=node)
        mine, theirs = me.long_id, node.long_id
        wanted = []
        for key in candidates:
            self._stats.replication_examined += 1
            target = int.from_bytes(key, "big")  # the key is the digest already
            closest = heapq.nsmallest(ksize, [other ^ target for other in others])
            if closest:
                new_close = len(closest) < ksize or theirs ^ target < closest[-1]
                if not (new_close and mine ^ target < closest[0]):
                    continue
            wanted.append(key)
        return wanted

    async def _replicate_to(self, node: Node, *, only_asked: bool) -> None:
        """Offer ``node`` the records it should hold, and send those it wants.

        ``only_asked``: it never answered us (a lookup client, say). If it does not
        answer the offer either it is gone, and nothing is sent. A contact that served
        and does not answer is sent the records anyway: a node from before replica sync
        ignores the ``offer`` RPC (its store RPCs then say whether it is alive)."""
        keys = self.keys_for(node)
        if not keys:
            return
        try:
            held = []
            for key in keys:
                bindings = await self._store.get(key, self._clock())
                if bindings:
                    held.append((key, bindings))
                else:
                    self.index.discard(key)  # expired or no longer trusted
            for start in range(0, len(held), MAX_OFFER):
                batch = held[start : start + MAX_OFFER]
                wanted = await self._offer(node, batch)
                if wanted is None and only_asked:
                    self._suspect(node)  # gone: a confirming ping decides if it stays
                    return
                for position in range(len(batch)) if wanted is None else wanted:
                    key, bindings = batch[position]
                    if not await self.send_record(node, key, record_chunks(bindings)):
                        return  # it stopped answering: the rest would fail too
        except RecordStoreError as exc:
            log.warning("cannot replicate to %s: %s", node, exc)

    async def _offer(self, node: Node, batch: Sequence[tuple[bytes, Bindings]]) -> list[int] | None:
        """The positions in ``batch`` that ``node`` wants sent, or None if it did not
        answer. No answer does not mark it dead (see :meth:`_replicate_to`)."""
        address = (node.ip, node.port)
        if self._closed or address in self._dead:
            return []
        entries = [(key, held_digest(bindings)) for key, bindings in batch]
        self._stats.offers += 1
        self._stats.offered_keys += len(entries)
        ok, answer = await self._request(address, "offer", (self.source_node.id, entries), node.id)
        if not ok:
            self._stats.offers_unanswered += 1
            return None
        if not isinstance(answer, list):
            return []  # busy, or nonsense: nothing now (repair and republishing do it later)
        wanted = sorted({p for p in answer if type(p) is int and 0 <= p < len(batch)})
        self._stats.offers_taken += len(wanted)
        return wanted

    def prune(self) -> None:
        """Forget replication times older than ``dead_ttl`` and sessions of keys no longer
        trusted; log the refused datagrams not logged yet."""
        now = self._now()
        horizon = now - self._dead_ttl
        self._welcomed = {n: since for n, since in self._welcomed.items() if since >= horizon}
        self._sessions.forget_untrusted()
        line = self._refusals.flush(now)
        if line is not None:
            log.warning("%s", line)

    @property
    def sessions_made(self) -> int:
        return self._sessions.made

    def shutdown(self) -> None:
        """Stop answering; every RPC still waiting fails now instead of at its timeout."""
        self._closed = True
        if self._beat is not None:
            self._beat.cancel()
        for future, timer in self._outstanding.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        self._expect.clear()


def _offer_entry(entry: object) -> tuple[bytes, bytes]:
    """(key, digest) of one entry of an offer; BadRequest if it is not one."""
    if not (isinstance(entry, list) and len(entry) == 2):
        raise BadRequest("an offer entry is [key, digest]")
    key, digest = entry
    if not (is_node_id(key) and isinstance(digest, bytes) and len(digest) == DIGEST_BYTES):
        raise BadRequest(f"an offer entry is a 20-byte key and a {DIGEST_BYTES}-byte digest")
    return key, digest


def _unmapped(ip: str) -> str:
    """``::ffff:a.b.c.d`` (an IPv4 node seen by a dual-stack socket) as ``a.b.c.d``."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip

"""A Kademlia DHT node holding signed, merged binding records: the :class:`DhtNode` facade.

kademlia 2.2.3 gives us routing and the UDP RPC layer; what does not fit a location
service (see STYLE.md for its limits) is replaced here, in :mod:`dht_adaptor.protocol`
(RPC handlers: merged, verified values; cheap dead nodes; robust to bad peers) and in
:mod:`dht_adaptor.lookup` (the lookup), the only three modules that import the engine.
Here are :class:`DhtNode` and :class:`NodeServer`, kademlia's ``Server`` with our
protocol and tracked background tasks. :class:`DhtNode` adds:

* **Merged reads.** ``get`` asks *all* of the k closest nodes, verifies each answer and
  merges them (kademlia stops at the first value, so one site's bindings would hide
  another's).
* **Typed failures.** ``put``/``get`` raise :class:`DhtUnavailable`, :class:`DhtRejected`,
  :class:`InvalidBindings` (from :mod:`dht_adaptor.errors`, re-exported here) or
  ``record.RecordTooLarge`` instead of returning None/False.
* **Quorums** (:mod:`dht_adaptor.quorum`): k = 8 copies; a put is acknowledged when 3
  of them hold the record and says how many do (:class:`Stored`); a get that found
  nothing from fewer than n - 3 + 1 of the closest nodes raises DhtUnavailable.
* **Overload degrades, never disconnects.** At most ``max_puts`` puts run at once (the
  rest queue: back-pressure on the adaptor's writer); a node whose routing table
  emptied re-joins by itself (its bootstrap nodes, then contacts it knew); ``stats``
  reports what its queues hold (``backlog``) and how late its event loop runs.
* **Republishing and read repair.** Every ``republish_interval`` the node re-stores what
  it holds at the current k closest nodes; after a ``get`` the closest nodes that lacked
  part of the merged record are sent it. Both are safe because merge is idempotent.
* **Members only.** The node proves its membership with its site's key in every datagram
  and its id is bound to that key (:mod:`dht_adaptor.membership`); it hears only nodes
  whose key its TrustStore holds at that moment.
* **Partitions heal at the next lookup.** A ``get`` that no node answered with a value,
  while known-dead contacts that would rank among the k closest were left out, is
  repeated once with them re-admitted: the far side of a healed partition is asked
  instead of being hidden by the dead-contact marks for ``dead_ttl``.

A record larger than one store RPC (several sites' bindings merged) is replicated in
chunks: any subset of a record merges in like the whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from kademlia.network import Server
from kademlia.node import Node

from dht_adaptor.errors import DhtError, DhtRejected, DhtUnavailable, InvalidBindings
from dht_adaptor.keys import SiteKey, TrustStore
from dht_adaptor.lookup import IterativeLookup
from dht_adaptor.membership import SALT_BYTES, Member
from dht_adaptor.protocol import (
    Address,
    Bindings,
    DhtStats,
    NodeProtocol,
    NoStorage,
    Spawn,
    record_chunks,
)
from dht_adaptor.quorum import DEFAULT_KSIZE, DEFAULT_WRITE_QUORUM, Quorum, Stored
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
from dht_adaptor.stats import Load

__all__ = [
    "DhtError",
    "DhtNode",
    "DhtRejected",
    "DhtUnavailable",
    "InvalidBindings",
    "RecordTooLarge",
    "Stored",
]

log = logging.getLogger(__name__)

DEFAULT_RPC_TIMEOUT = 0.5  # seconds; kademlia's 5 s made every dead contact cost 5 s
DEFAULT_REPUBLISH_INTERVAL = 600.0
DEFAULT_SWEEP_INTERVAL = 60.0
DEFAULT_DEAD_TTL = 30.0
DEFAULT_MAX_PUTS = 16  # puts at once; more wait (back-pressure on the adaptor's writer)
DEFAULT_WELCOME_DELAY = 2.0
_TICK = 0.25  # seconds between two rounds of NodeProtocol.maintain
_REJOIN_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)


def _versions(bindings: Bindings) -> set[tuple[tuple[str, str, str], int]]:
    return {(b.identity, b.version) for b in bindings}


class NodeServer(Server):  # type: ignore[misc]
    """kademlia's Server with our protocol and tracked background tasks."""

    def __init__(
        self,
        make_protocol: Callable[[Node, int], NodeProtocol],
        spawn: Spawn,
        *,
        ksize: int,
        alpha: int,
        node_id: bytes | None,
    ) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=NoStorage())
        self._make_protocol = make_protocol
        self._spawn = spawn

    def _create_protocol(self) -> NodeProtocol:
        return self._make_protocol(self.node, self.ksize)

    def refresh_table(self, interval: float = 3600) -> None:
        self._spawn(self._refresh_table())
        loop = asyncio.get_running_loop()
        self.refresh_loop = loop.call_later(interval, self.refresh_table, interval)

    async def _refresh_table(self) -> None:
        # Only the bucket refresh; records are republished by DhtNode from the RecordStore.
        protocol, crawls = self.protocol, []
        for node_id in protocol.get_refresh_ids():
            target = Node(node_id)
            nearest = protocol.router.find_neighbors(target, self.alpha)
            lookup = IterativeLookup(protocol, target, nearest, self.ksize, self.alpha, self._spawn)
            crawls.append(lookup.run())
        await asyncio.gather(*crawls)


class DhtNode:
    """One DHT node: a kademlia server whose values are verified, merged binding records."""

    def __init__(
        self,
        store: RecordStore,
        trust: TrustStore,
        *,
        key: SiteKey,
        salt: bytes | None = None,
        ksize: int = DEFAULT_KSIZE,
        alpha: int = 3,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
        clock: Callable[[], float] = time.time,
        republish_interval: float = DEFAULT_REPUBLISH_INTERVAL,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
        dead_ttl: float = DEFAULT_DEAD_TTL,
        hedge: bool = True,
        write_quorum: int = DEFAULT_WRITE_QUORUM,
        max_puts: int = DEFAULT_MAX_PUTS,
        welcome_delay: float = DEFAULT_WELCOME_DELAY,
        sessions: bool = True,
    ) -> None:
        """``store`` stays the caller's: :meth:`close` does not close it.

        ``key`` is the site's: every datagram is signed with it, and the node id is
        SHA-1(public key || ``salt``) (``salt``: 8 bytes, random if not given; the same
        salt gives the same node id again). Only nodes whose key ``trust`` holds are
        heard; ``trust`` also decides which bindings are believed.

        ``rpc_timeout`` is when an RPC fails and its node is evicted; with ``hedge`` a
        lookup asks the next node after a few round-trip times meanwhile (see IterativeLookup).

        ``ksize`` copies of each record, ``write_quorum`` of them acknowledge a put
        (:mod:`dht_adaptor.quorum`); at most ``max_puts`` puts at once. A contact that
        only asked us something is sent records after ``welcome_delay`` seconds if it
        still answers. ``sessions`` False signs every datagram (the measurement baseline).
        """
        if ksize < 1 or alpha < 1 or write_quorum < 1 or max_puts < 1:
            raise ValueError(
                f"ksize, alpha, write_quorum and max_puts must be positive, not "
                f"{ksize}, {alpha}, {write_quorum} and {max_puts}"
            )
        for name, value in (
            ("rpc_timeout", rpc_timeout),
            ("republish_interval", republish_interval),
            ("sweep_interval", sweep_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if dead_ttl < 0:
            raise ValueError(f"dead_ttl must not be negative, not {dead_ttl}")
        self._member = Member(key, os.urandom(SALT_BYTES) if salt is None else salt)
        self._store = store
        self._trust = trust
        self._ksize = ksize
        self._alpha = alpha
        self._clock = clock
        self._rpc_timeout = rpc_timeout
        self._dead_ttl = dead_ttl
        self._hedge = hedge
        self._write_quorum = write_quorum
        self._welcome_delay = welcome_delay
        self._sessions = sessions
        self._put_slots = asyncio.Semaphore(max_puts)
        self._puts_waiting = 0
        self._seeds: list[Address] = []
        self._rejoin_at = 0.0
        self._rejoin_failures = 0
        self._republish_interval = republish_interval
        self._sweep_interval = sweep_interval
        self._counters = DhtStats()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._had_peers = False
        self._address: Address | None = None
        self._server = NodeServer(
            self._make_protocol, self._spawn, ksize=ksize, alpha=alpha, node_id=self._member.node_id
        )

    def __repr__(self) -> str:
        return f"DhtNode({self.node_id_hex[:12]}…, {self._address})"

    def _make_protocol(self, source_node: Node, ksize: int) -> NodeProtocol:
        return NodeProtocol(
            source_node,
            ksize,
            member=self._member,
            trust=self._trust,
            store=self._store,
            clock=self._clock,
            stats=self._counters,
            spawn=self._spawn,
            rpc_timeout=self._rpc_timeout,
            dead_ttl=self._dead_ttl,
            hedge=self._hedge,
            welcome_delay=self._welcome_delay,
            sessions=self._sessions,
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
    def _protocol(self) -> NodeProtocol:
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
    def trust(self) -> TrustStore:
        """The member sites' keys this node believes (shared with the rest of the site)."""
        return self._trust

    @property
    def member(self) -> Member:
        """This node's proof of membership: the site key and the salt of its node id."""
        return self._member

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
        self._spawn(self._index_store())
        self._spawn(self._maintain())
        return self._address[1]

    async def _index_store(self) -> None:
        """Index what the store already holds (a restart on Redis, preloaded records)."""
        try:
            async for key, _ in self._store.items(self._clock()):
                self._protocol.index.add(key)
        except (RecordStoreError, DhtUnavailable) as exc:
            log.warning("cannot index the records held: %s", exc)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            protocol = self._protocol
            protocol.maintain()
            if self._has_peers():
                self._had_peers = True
            elif self._had_peers:
                await self._rejoin(protocol)

    async def _rejoin(self, protocol: NodeProtocol) -> None:
        """The routing table emptied (every peer timed out, say after an overload): join
        again through the bootstrap nodes and the contacts we marked dead, with backoff."""
        now = asyncio.get_running_loop().time()
        if now < self._rejoin_at:
            return
        known = [(n.ip, n.port) for n in protocol.dead_contacts()]
        addresses = list(dict.fromkeys(self._seeds + known))[: 4 * self._ksize]
        for address in addresses:
            protocol.forget_dead(address)
        log.warning("DHT routing table empty: re-joining via %d known node(s)", len(addresses))
        if await self._join(addresses):
            self._counters.rejoins += 1
            self._rejoin_failures = 0
            log.warning("DHT node re-joined: %d peer(s)", len(self.peers()))
        else:
            delay = _REJOIN_DELAYS[min(self._rejoin_failures, len(_REJOIN_DELAYS) - 1)]
            self._rejoin_failures += 1
            self._rejoin_at = asyncio.get_running_loop().time() + delay

    async def ping(self, addr: tuple[str, int]) -> bool:
        """Does a DHT node answer at ``addr`` (hostnames resolved)? Joins nothing."""
        resolved = await self._resolve(*addr)
        if resolved is None:
            return False
        return await self._protocol.ping_address(resolved) is not None

    async def bootstrap(self, addrs: Sequence[tuple[str, int]]) -> int:
        """Join via known nodes (hostnames are resolved); returns how many peers we know."""
        resolved = await asyncio.gather(*(self._resolve(host, port) for host, port in addrs))
        addresses = [a for a in resolved if a is not None]
        self._seeds = list(dict.fromkeys(self._seeds + addresses))[-64:]
        await self._join(addresses)
        return len(self.peers())

    async def _join(self, addresses: Sequence[Address]) -> int:
        """Ping ``addresses``, welcome those that answer, look ourselves up through them;
        returns how many answered."""
        protocol = self._protocol
        pings = [protocol.ping_address(a) for a in addresses]
        seeds = []
        for address, node_id in zip(addresses, await asyncio.gather(*pings), strict=True):
            if node_id == self.node_id and address in self._seeds:
                self._seeds.remove(address)  # ourselves (a bootstrap list naming every node)
            if node_id is not None and node_id != self.node_id:
                seed = Node(node_id, address[0], address[1])
                protocol.handle_call_response((True, node_id), seed)  # it answered
                seeds.append(seed)
        if seeds:
            self._had_peers = True
            await self._lookup(protocol, self._server.node, seeds).run()
        return len(seeds)

    async def _resolve(self, host: str, port: int) -> Address | None:
        return await self._protocol.resolve(host, port)

    def peers(self) -> list[tuple[str, str, int]]:
        """(node id hex, host, port) of every node in the routing table."""
        protocol = self._server.protocol
        if protocol is None:
            return []
        return [
            (bytes(n.id).hex(), n.ip, n.port)
            for bucket in protocol.router.buckets
            for n in bucket.get_nodes()
        ]

    def _has_peers(self) -> bool:
        protocol = self._server.protocol
        return protocol is not None and any(b.nodes for b in protocol.router.buckets)

    def _alone(self) -> bool:
        """True while this node has never known a peer and was given no other node to
        join through: it is the whole overlay. A node whose bootstrap nodes have not
        answered yet is not: what it does not hold is unknown, not absent (a get raises
        DhtUnavailable, and the proxy answers 503, not 404)."""
        return not self._seeds and not self._had_peers and not self._has_peers()

    async def _closest(self, target: Node) -> tuple[list[Node], int]:
        """The k closest nodes to ``target`` that answered, and how many nodes the
        lookup heard of (for the quorums)."""
        protocol = self._protocol
        peers = protocol.live_neighbors(target)
        if not peers:
            return [], 0
        lookup = self._lookup(protocol, target, peers)
        nodes = await lookup.run()
        return nodes, len(lookup.heard - {self.node_id})

    def _lookup(
        self, protocol: NodeProtocol, target: Node, peers: list[Node], *, revive: bool = False
    ) -> IterativeLookup:
        return IterativeLookup(
            protocol, target, peers, self._ksize, self._alpha, self._spawn, revive=revive
        )

    def _we_are_close(self, target: Node, nodes: list[Node]) -> bool:
        if len(nodes) < self._ksize:
            return True
        own = self._server.node.distance_to(target)
        return bool(own < max(n.distance_to(target) for n in nodes))

    # -- put and get -------------------------------------------------------------------

    async def put(self, aor: str, bindings: Sequence[DhtBinding]) -> Stored:
        """Store our bindings of ``aor`` at the k closest nodes; returns how many hold
        them (a :class:`Stored`: an int that also says how many should).

        At most ``max_puts`` run at once; the others wait their turn. Raises
        InvalidBindings, RecordTooLarge (before sending anything), DhtUnavailable (no
        peers, or fewer than the write quorum took it; a local copy, if this node is
        among the closest, is kept and republished) or DhtRejected (every node refused).
        """
        self._puts_waiting += 1
        try:
            await self._put_slots.acquire()
        finally:
            self._puts_waiting -= 1
        started = time.perf_counter()
        try:
            stored = await self._put(aor, tuple(bindings))
        except (DhtError, RecordError):
            self._counters.puts_failed += 1
            raise
        finally:
            self._put_slots.release()
            self._counters.put_latency.add(time.perf_counter() - started)
        self._counters.puts_ok += 1
        if not stored.complete:
            self._counters.puts_partial += 1
        return stored

    async def _put(self, aor: str, bindings: Bindings) -> Stored:
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
        nodes, heard = await self._closest(target)
        if not nodes and self._alone():
            # A node that never knew a peer is the whole overlay (a lone site, the first
            # node before others join): it is the closest node, so it keeps the record,
            # and republishes it to closer nodes once they join.
            if (await self._store.merge_bindings(key, bindings, self._clock())).ok:
                self._indexed(key)
                return Stored(1, 1)
            raise DhtRejected(f"the local store refused the record of {aor!r}")
        if not nodes:
            raise DhtUnavailable(f"no DHT peer answered to store {aor!r}")
        local = self._we_are_close(target, nodes)
        protocol = self._protocol
        results = await asyncio.gather(*(protocol.call_store(n, key, value) for n in nodes))
        accepted = sum(1 for ok, answer in results if ok and answer is True)
        answered = sum(1 for ok, _ in results if ok)
        if local:
            try:
                if (await self._store.merge_bindings(key, bindings, self._clock())).ok:
                    accepted += 1
                    self._indexed(key)
            except RecordStoreError as exc:
                log.warning("cannot store %s locally: %s", aor, exc)
        quorum = self._quorum(heard)
        wanted = min(self._ksize, len(nodes) + local)
        if accepted >= quorum.write:
            log.debug("put %s: %d of %d nodes took it", aor, accepted, wanted)
            return Stored(accepted, wanted)
        refused = answered - sum(1 for ok, answer in results if ok and answer is True)
        if refused:
            raise DhtRejected(
                f"{refused} DHT node(s) refused the record of {aor!r}; "
                f"{accepted} hold it, {quorum.write} needed"
            )
        raise DhtUnavailable(
            f"{aor!r} stored at {accepted} node(s) of {wanted}: {quorum.write} needed"
        )

    def _quorum(self, heard: int) -> Quorum:
        """The quorums for a key of which ``heard`` other nodes were heard of."""
        return Quorum.of(self._ksize, self._write_quorum, heard + 1)

    def _indexed(self, key: bytes) -> None:
        protocol = self._server.protocol
        if protocol is not None:
            protocol.index.add(key, asyncio.get_running_loop().time())

    async def get(self, aor: str, *, tombstones: bool = False) -> Bindings:
        """The live, verified bindings of ``aor`` merged from every close node that answers
        (with ``tombstones``, also the unexpired tombstones: they say the AOR was
        registered until recently).

        Returns () when nobody has any and enough of the closest nodes said so (the
        read quorum, :mod:`dht_adaptor.quorum`); raises DhtUnavailable when fewer
        answered: "unknown" is never turned into "nobody".
        """
        started = time.perf_counter()
        try:
            result = await self._get(aor)
            if not tombstones:
                result = live(result, self._clock())
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
        heard: set[bytes] = set()
        skipped = {n.id: n for n in protocol.dead_near(target)}
        if peers:
            lookup = self._lookup(protocol, target, peers)
            closest = await lookup.run(find_value=True)
            heard |= lookup.heard
            found = {nid: self._admit_answer(key, v) for nid, v in lookup.values.items()}
            skipped.update(lookup.skipped)
        missed = self._would_rank(target, closest, skipped.values())
        if missed and not any(found.values()):
            # Nodes that timed out lately may hold it: the far side of a partition that
            # healed since, say. Ask once more with them re-admitted.
            log.debug("get %s: again, with %d known-dead contact(s)", aor, len(missed))
            self._counters.get_retries += 1
            retry = self._lookup(protocol, target, peers + missed, revive=True)
            closest = await retry.run(find_value=True)
            heard |= retry.heard
            found.update({nid: self._admit_answer(key, v) for nid, v in retry.values.items()})
        merged = merge(local, *found.values(), now=now)
        if merged:
            protocol.spawn_background(self._repair(key, merged, closest, found, local, target))
            return merged
        if not peers and not closest:
            if self._alone():
                return ()  # a node that never knew a peer is the whole overlay: "none" it is
            self._counters.gets_unknown += 1
            raise DhtUnavailable(f"no DHT node answered for {aor!r}: not joined (yet)")
        heard |= {bytes(n.id) for n in skipped.values()}
        heard.discard(self.node_id)
        quorum = self._quorum(len(heard))
        answers = len(closest) + self._we_are_close(target, closest)
        if answers < quorum.read:
            self._counters.gets_unknown += 1
            raise DhtUnavailable(
                f"nothing for {aor!r} from {answers} of its {quorum.replicas} closest "
                f"DHT nodes: {quorum.read} needed to say there is none"
            )
        return ()

    def _would_rank(self, target: Node, closest: list[Node], nodes: Iterable[Node]) -> list[Node]:
        """Those of ``nodes`` that would be among the k closest to ``target`` had they
        answered, with ``closest`` the nodes that did."""
        answered = {n.id for n in closest}
        if len(closest) < self._ksize:
            return [n for n in nodes if n.id not in answered]
        farthest = max(n.distance_to(target) for n in closest)
        return [n for n in nodes if n.id not in answered and n.distance_to(target) < farthest]

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
        chunks = record_chunks(merged)
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
            self._indexed(key)
        except RecordStoreError as exc:
            log.warning("cannot store key %s locally: %s", key.hex(), exc)

    # -- maintenance -------------------------------------------------------------------

    async def republish(self) -> int:
        """Re-store every held record at the current k closest nodes, except those stored
        here by someone within ``republish_interval`` (Kademlia paper §2.5: a store
        reached the other close nodes too); returns stores made."""
        protocol = self._protocol
        index = protocol.index
        horizon = asyncio.get_running_loop().time() - self._republish_interval
        sent = 0
        async for key, bindings in self._store.items(self._clock()):
            stored_at = index.stored_at(key)
            if stored_at is None:
                index.add(key)
            elif stored_at > horizon:
                continue
            nodes, _ = await self._closest(Node(key))
            chunks = record_chunks(bindings)
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

    def load(self) -> Load:
        """What this node's own queues hold now (``backlog`` in :meth:`stats` sums them)."""
        protocol = self._server.protocol
        if protocol is None:
            return Load(puts_waiting=self._puts_waiting)
        return Load(
            requests=protocol.requests,
            outstanding=protocol.outstanding,
            background=protocol.background,
            puts_waiting=self._puts_waiting,
            welcomes_pending=protocol.welcomes_pending,
            loop_lag=protocol.lag,
        )

    def stats(self) -> dict[str, float]:
        """A snapshot of the counters, with the store's accepted/rejected and latencies,
        and the queues (``backlog``: requests, background jobs and puts not done yet)."""
        protocol = self._server.protocol
        if protocol is not None:
            self._counters.sessions = protocol.sessions_made
        return self._counters.snapshot(
            accepted=self._store.accepted,
            rejected=self._store.rejected,
            peers=len(self.peers()),
            load=self.load(),
        )

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

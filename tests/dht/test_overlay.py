"""DhtNode on real UDP sockets: an overlay of 32 nodes of two sites on loopback in one
event loop (half the nodes share one site key, half the other).

Assertions are about results (which bindings a lookup returns), never about timings;
``asyncio.wait_for`` only guards against hangs. Latency under churn is measured by
bench/dht_churn.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
import umsgpack
from kademlia.node import Node

from dht_adaptor.keys import SiteKey, TrustStore, sign_binding
from dht_adaptor.membership import Member, node_id_of, open_datagram
from dht_adaptor.node import DhtNode, DhtRejected, DhtUnavailable, InvalidBindings
from dht_adaptor.record import (
    DhtBinding,
    RecordTooLarge,
    dht_key,
    encode_record,
    new_binding,
    tombstone_of,
)
from dht_adaptor.record_store import MemoryRecordStore, RedisRecordStore
from tests.support.redis_server import RedisServer

NODES = 32
KSIZE = 10  # below the overlay size, so records live on a subset of the nodes
HANG_GUARD = 10.0  # seconds; a guard against hangs, not a latency target


@dataclasses.dataclass
class Sites:
    paris: SiteKey
    tokyo: SiteKey
    stranger: SiteKey
    trust: TrustStore


@pytest.fixture(scope="module")
def sites() -> Sites:
    paris, tokyo, stranger = SiteKey.generate(), SiteKey.generate(), SiteKey.generate()
    trust = TrustStore({paris.key_id: paris.public_bytes, tokyo.key_id: tokyo.public_bytes})
    return Sites(paris, tokyo, stranger, trust)


def salt_near(key: SiteKey, target: bytes, bits: int = 16) -> bytes:
    """A salt that gives ``key`` a node id sharing the first ``bits`` bits with ``target``
    (ids are bound to keys: the closest id one can have is one ground for)."""
    want = int.from_bytes(target, "big") >> (160 - bits)
    for n in itertools.count():
        salt = n.to_bytes(8, "big")
        if int.from_bytes(node_id_of(key.public_bytes, salt), "big") >> (160 - bits) == want:
            return salt
    raise AssertionError("unreachable")


class Overlay:
    def __init__(self, sites: Sites) -> None:
        self.sites = sites
        self.trust = sites.trust
        self.nodes: list[DhtNode] = []
        self.stores: list[MemoryRecordStore] = []
        self.closed: set[int] = set()

    async def add(self, *, key: SiteKey | None = None, **kw: object) -> DhtNode:
        store = MemoryRecordStore(self.trust)
        if key is None:  # two sites, several nodes each
            key = (self.sites.paris, self.sites.tokyo)[len(self.nodes) % 2]
        node = DhtNode(store, self.trust, key=key, ksize=KSIZE, **kw)  # type: ignore[arg-type]
        await node.listen("127.0.0.1", 0)
        seeds = [n.address for n in self.alive()[:2]]
        self.nodes.append(node)
        self.stores.append(store)
        if seeds:
            await node.bootstrap(seeds)
        return node

    def alive(self) -> list[DhtNode]:
        return [n for i, n in enumerate(self.nodes) if i not in self.closed]

    async def kill(self, indexes: Sequence[int]) -> None:
        for i in indexes:
            self.closed.add(i)
            await self.nodes[i].close()

    def holders(self, aor: str) -> int:
        key = dht_key(aor)
        return sum(1 for i, s in enumerate(self.stores) if i not in self.closed and key in s._held)

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()


@pytest.fixture
async def overlay(sites: Sites) -> AsyncIterator[Overlay]:
    overlay = Overlay(sites)
    try:
        for _ in range(NODES):
            await overlay.add()
        # A second pass lets early nodes learn about the late ones, as refresh would.
        await asyncio.gather(*(n.bootstrap([overlay.nodes[-1].address]) for n in overlay.nodes))
        yield overlay
    finally:
        await overlay.close()


def bind(key: SiteKey, aor: str, contact: str, *, site: str, version: int = 1) -> DhtBinding:
    unsigned = new_binding(
        aor=aor,
        contact=contact,
        home=f"sip:proxy.{site}.example.com",
        site=site,
        version=version,
        now=time.time(),
        expires=3600,
    )
    return sign_binding(unsigned, key)


def contacts(bindings: Sequence[DhtBinding]) -> list[str]:
    return sorted(b.contact for b in bindings)


async def test_put_on_one_node_get_from_others(overlay: Overlay, sites: Sites) -> None:
    rng = random.Random(1)
    published = {}
    for i in range(8):
        aor = f"sip:user{i}@example.com"
        binding = bind(sites.paris, aor, f"sip:user{i}@10.0.0.{i}", site="paris")
        accepted = await rng.choice(overlay.nodes).put(aor, [binding])
        assert accepted >= KSIZE // 2
        published[aor] = binding
    for aor, binding in published.items():
        reader = rng.choice(overlay.nodes)
        assert await asyncio.wait_for(reader.get(aor), HANG_GUARD) == (binding,)
    assert await overlay.nodes[0].get("sip:nobody@example.com") == ()
    stats = overlay.nodes[0].stats()
    assert stats["gets_ok"] >= 1 and stats["gets_failed"] == 0
    assert sum(n.stats()["puts_ok"] for n in overlay.nodes) == len(published)


async def test_concurrent_puts_of_two_sites_both_found(overlay: Overlay, sites: Sites) -> None:
    aor = "sip:alice@example.com"
    paris = bind(sites.paris, aor, "sip:alice@10.0.0.1", site="paris")
    tokyo = bind(sites.tokyo, aor, "sip:alice@10.9.0.1", site="tokyo")
    await asyncio.gather(overlay.nodes[3].put(aor, [paris]), overlay.nodes[17].put(aor, [tokyo]))
    for reader in (overlay.nodes[0], overlay.nodes[9], overlay.nodes[-1]):
        assert set(await reader.get(aor)) == {paris, tokyo}


async def test_tombstone_removes_exactly_its_binding(overlay: Overlay, sites: Sites) -> None:
    aor = "sip:carol@example.com"
    desk = bind(sites.paris, aor, "sip:desk@10.0.0.1", site="paris")
    mobile = bind(sites.paris, aor, "sip:mobile@10.0.0.2", site="paris")
    tokyo = bind(sites.tokyo, aor, "sip:carol@10.9.0.1", site="tokyo")
    await overlay.nodes[1].put(aor, [desk, mobile])
    await overlay.nodes[2].put(aor, [tokyo])
    gone = sign_binding(tombstone_of(desk, version=2), sites.paris)
    await overlay.nodes[5].put(aor, [gone, mobile])
    for reader in overlay.nodes[10:13]:
        assert contacts(await reader.get(aor)) == ["sip:carol@10.9.0.1", "sip:mobile@10.0.0.2"]


async def test_lookups_survive_the_loss_of_a_third(overlay: Overlay, sites: Sites) -> None:
    rng = random.Random(7)
    published = {}
    for i in range(6):
        aor = f"sip:churn{i}@example.com"
        published[aor] = bind(sites.paris, aor, f"sip:churn{i}@10.0.1.{i}", site="paris")
        await rng.choice(overlay.nodes).put(aor, [published[aor]])
    await overlay.kill(rng.sample(range(NODES), NODES // 3))
    readers = overlay.alive()

    async def lookup(aor: str) -> tuple[DhtBinding, ...]:
        return await asyncio.wait_for(rng.choice(readers).get(aor), HANG_GUARD)

    results = await asyncio.gather(*(lookup(aor) for aor in published))
    assert dict(zip(published, results, strict=True)) == {a: (b,) for a, b in published.items()}
    # Again, now that dead contacts are known: still every binding.
    results = await asyncio.gather(*(lookup(aor) for aor in published))
    assert dict(zip(published, results, strict=True)) == {a: (b,) for a, b in published.items()}
    await asyncio.sleep(0.6)  # the default rpc_timeout: lookups set dead contacts aside sooner
    assert sum(n.stats()["rpc_timeouts"] for n in readers) > 0
    # Writes still work too.
    late = bind(sites.tokyo, "sip:late@example.com", "sip:late@10.9.0.9", site="tokyo")
    assert await asyncio.wait_for(readers[0].put(late.aor, [late]), HANG_GUARD) >= 1
    assert await asyncio.wait_for(readers[-1].get(late.aor), HANG_GUARD) == (late,)


async def test_forged_bindings_from_a_member_node(overlay: Overlay, sites: Sites) -> None:
    # Membership is no licence to publish: a member node's records are verified like any.
    # (Non-members are not even heard: tests/dht/test_closed_overlay.py.)
    aor = "sip:dave@example.com"
    key = dht_key(aor)
    real = bind(sites.paris, aor, "sip:dave@10.0.0.4", site="paris")
    await overlay.nodes[0].put(aor, [real])
    rejected_before = sum(s.rejected for s in overlay.stores)

    attacker = await overlay.add(key=sites.tokyo)
    protocol = attacker._protocol
    # 1. A record signed by a key nobody trusts, stored the way a put stores.
    untrusted = bind(sites.stranger, aor, "sip:evil@203.0.113.66", site="paris", version=9)
    # 2. Raw store RPCs at every node: a forged signature under a trusted key id.
    forged = dataclasses.replace(real, contact="sip:evil@203.0.113.66", version=99)
    answers = await asyncio.gather(
        *(
            protocol.call_store(Node(n.node_id, *n.address), key, value)
            for n in overlay.nodes[:8]
            for value in (encode_record([untrusted]), encode_record([forged]), b"garbage")
        )
    )
    assert answers == [(True, False)] * 24
    for reader in overlay.nodes[::4]:
        assert await reader.get(aor) == (real,)
    assert sum(s.rejected for s in overlay.stores) >= rejected_before + 24


async def test_a_new_close_node_is_sent_the_records_it_should_hold(
    overlay: Overlay, sites: Sites
) -> None:
    aor = "sip:erin@example.com"
    key = dht_key(aor)
    binding = bind(sites.tokyo, aor, "sip:erin@10.9.0.5", site="tokyo")
    await overlay.nodes[6].put(aor, [binding])
    # An id very close to the key: kademlia 2.2.3 re-digested the key here and compared
    # distances to the wrong point.
    newcomer = await overlay.add(key=sites.paris, salt=salt_near(sites.paris, key))
    store = overlay.stores[-1]

    async def arrived() -> None:
        while await store.get(key, time.time()) != (binding,):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(arrived(), HANG_GUARD)
    assert newcomer.stats()["accepted"] >= 1


async def test_republish_restores_replicas(overlay: Overlay, sites: Sites) -> None:
    aor = "sip:frank@example.com"
    key = dht_key(aor)
    binding = bind(sites.paris, aor, "sip:frank@10.0.0.6", site="paris")
    keeper = overlay.nodes[11]
    # Only one node holds the record (the others lost theirs, say).
    assert (await overlay.stores[11].merge_in(key, encode_record([binding]), time.time())).ok
    assert overlay.holders(aor) == 1
    assert await keeper.republish() >= KSIZE // 2
    assert overlay.holders(aor) >= KSIZE // 2
    assert await overlay.nodes[20].get(aor) == (binding,)


async def test_bad_datagrams_from_a_member_are_ignored_quietly(
    overlay: Overlay, sites: Sites, caplog: pytest.LogCaptureFixture
) -> None:
    # Sealed by a member, so that they get past membership to the RPC layer's checks.
    caplog.set_level(logging.WARNING)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    target = overlay.nodes[0]
    member = Member(sites.tokyo, b"raw-sock")
    me = member.node_id
    msg = b"\x00" + bytes(20)
    datagrams = [
        b"",
        b"\x00",
        b"x" * 30,
        msg + b"\xc1",  # reserved msgpack code
        msg + b"\x91" * 5000,  # nested too deeply
        msg + umsgpack.packb(["store", []]),
        msg + umsgpack.packb(["store", [b"x", 1, 2]]),
        msg + umsgpack.packb(["find_value", ["no", "bytes"]]),
        msg + umsgpack.packb(["find_node", [me, bytes(20), 3]]),
        msg + umsgpack.packb(["ping", [None]]),
        msg + umsgpack.packb(["nosuch", []]),
        msg + umsgpack.packb([1, 2, 3]),
        msg + umsgpack.packb({"a": 1}),
        b"\x01" + bytes(20) + umsgpack.packb("unsolicited response"),
        b"\x07" + bytes(20) + umsgpack.packb("unknown kind"),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for data in datagrams:
            sock.sendto(member.seal(data, time.time()), target.address)
        # A store with a value that is not a record is answered False.
        store = umsgpack.packb(["store", [me, dht_key("sip:x@y"), "not bytes"]])
        sock.sendto(member.seal(b"\x00" + b"\x01" * 20 + store, time.time()), target.address)
        sock.settimeout(HANG_GUARD)
        reply = await loop.run_in_executor(None, sock.recv, 65536)
    answer = open_datagram(reply, sites.trust, time.time())
    assert answer.node_id == target.node_id
    assert answer.datagram == b"\x01" + b"\x01" * 20 + umsgpack.packb(False)
    # Bad node lists in answers are filtered too (hostnames would block the loop).
    protocol = target._protocol
    assert protocol.parse_nodes([[bytes(20), "localhost", 1], [b"x", "127.0.0.1", 1]]) == []
    assert protocol.parse_nodes("junk") == []
    aor = "sip:grace@example.com"
    binding = bind(sites.paris, aor, "sip:grace@10.0.0.7", site="paris")
    await target.put(aor, [binding])
    assert await overlay.nodes[1].get(aor) == (binding,)
    await asyncio.sleep(0.1)
    assert errors == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert target.stats()["refused_datagrams"] == 0


# -- small overlays ------------------------------------------------------------------


@pytest.fixture
async def lone(sites: Sites) -> AsyncIterator[DhtNode]:
    node = DhtNode(MemoryRecordStore(sites.trust), sites.trust, key=sites.paris, rpc_timeout=0.2)
    await node.listen("127.0.0.1", 0)
    try:
        yield node
    finally:
        await node.close()


async def test_a_node_without_peers_is_the_whole_overlay(lone: DhtNode, sites: Sites) -> None:
    # A lone site (the embedded default) keeps and serves its records itself.
    aor = "sip:heidi@example.com"
    assert await lone.get(aor) == ()
    assert await lone.put(aor, [bind(sites.paris, aor, "sip:heidi@10.0.0.8", site="paris")]) == 1
    assert [b.contact for b in await lone.get(aor)] == ["sip:heidi@10.0.0.8"]
    assert lone.peers() == []
    assert lone.stats()["puts_failed"] == 0 and lone.stats()["gets_failed"] == 0


async def test_a_node_whose_peers_died(lone: DhtNode, sites: Sites) -> None:
    other = DhtNode(MemoryRecordStore(sites.trust), sites.trust, key=sites.tokyo, rpc_timeout=0.2)
    await other.listen("127.0.0.1", 0)
    assert await lone.bootstrap([("localhost", other.address[1])]) == 1  # hostname resolved
    assert lone.peers() == [(other.node_id_hex, "127.0.0.1", other.address[1])]
    aor = "sip:ivan@example.com"
    binding = bind(sites.paris, aor, "sip:ivan@10.0.0.9", site="paris")
    assert await lone.put(aor, [binding]) == 2  # the peer and this node (among the closest)
    await other.close()
    assert await lone.get(aor) == (binding,)  # nobody answers, but the local copy counts
    with pytest.raises(DhtUnavailable):
        await lone.put(aor, [binding])
    assert await lone.stored_count() == 1


async def test_a_node_that_never_reached_its_bootstrap_nodes_knows_nothing(
    lone: DhtNode, sites: Sites
) -> None:
    # Told to join through a node that does not answer, it is not the whole overlay: a
    # user registered elsewhere may exist, so "none" would be a 404 for a real user
    # (seen in the simulation: a node whose join failed answered every get with nothing).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        assert await lone.bootstrap([silent.getsockname()]) == 0
        with pytest.raises(DhtUnavailable):
            await lone.get("sip:kim@example.com")
        with pytest.raises(DhtUnavailable):
            await lone.put(
                "sip:kim@example.com",
                [bind(sites.paris, "sip:kim@example.com", "sip:kim@10.0.0.10", site="paris")],
            )


async def test_a_node_listed_in_its_own_bootstrap_list_is_still_alone(
    lone: DhtNode, sites: Sites
) -> None:
    # Every site's compose file may list every DHT node, its own included.
    assert await lone.bootstrap([lone.address]) == 0
    assert await lone.get("sip:lee@example.com") == ()


async def test_put_refuses_what_it_cannot_vouch_for(lone: DhtNode, sites: Sites) -> None:
    aor = "sip:judy@example.com"
    with pytest.raises(InvalidBindings):
        await lone.put(aor, [])
    with pytest.raises(InvalidBindings):
        await lone.put(aor, [bind(sites.paris, "sip:other@example.com", "sip:o@h", site="paris")])
    with pytest.raises(InvalidBindings):
        await lone.put(aor, [bind(sites.stranger, aor, "sip:judy@10.0.0.1", site="paris")])
    many = [bind(sites.paris, aor, f"sip:judy@10.0.0.{i}", site="paris") for i in range(40)]
    with pytest.raises(RecordTooLarge):
        await lone.put(aor, many)


async def test_all_nodes_refusing_is_dht_rejected(sites: Sites) -> None:
    aor = "sip:ken@example.com"
    farthest = bytes(b ^ 0xFF for b in dht_key(aor))  # so this node never stores locally
    # The peer hears the node (a tokyo member, like itself) but believes no paris binding.
    only_tokyo = TrustStore({sites.tokyo.key_id: sites.tokyo.public_bytes})
    peer = DhtNode(MemoryRecordStore(only_tokyo), only_tokyo, key=sites.tokyo)
    node = DhtNode(
        MemoryRecordStore(sites.trust), sites.trust, key=sites.tokyo, ksize=1,
        salt=salt_near(sites.tokyo, farthest),
    )  # fmt: skip
    try:
        await peer.listen("127.0.0.1", 0)
        await node.listen("127.0.0.1", 0)
        await node.bootstrap([peer.address])
        with pytest.raises(DhtRejected):
            await node.put(aor, [bind(sites.paris, aor, "sip:ken@10.0.0.1", site="paris")])
        assert peer.stats()["rejected"] == 1
    finally:
        await node.close()
        await peer.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_republish_and_sweep_run_on_their_own(sites: Sites) -> None:
    clock = Clock()
    aor = "sip:leo@example.com"
    key = dht_key(aor)
    keeper_store, peer_store = MemoryRecordStore(sites.trust), MemoryRecordStore(sites.trust)
    every = {"republish_interval": 0.1, "sweep_interval": 0.05, "clock": clock}
    keeper = DhtNode(keeper_store, sites.trust, key=sites.paris, **every)  # type: ignore[arg-type]
    peer = DhtNode(peer_store, sites.trust, key=sites.tokyo, **every)  # type: ignore[arg-type]
    try:
        await keeper.listen("127.0.0.1", 0)
        await peer.listen("127.0.0.1", 0)
        await peer.bootstrap([keeper.address])
        unsigned = new_binding(
            aor=aor, contact="sip:leo@10.0.0.3", home="sip:p.example.com", site="paris",
            version=1, now=clock.now, expires=60,
        )  # fmt: skip
        binding = sign_binding(unsigned, sites.paris)
        assert (await keeper_store.merge_in(key, encode_record([binding]), clock.now)).ok

        async def until(predicate: Callable[[], Awaitable[bool]]) -> None:
            while not await predicate():
                await asyncio.sleep(0.02)

        async def peer_has_it() -> bool:
            return await peer_store.get(key, clock.now) == (binding,)

        async def both_forgot() -> bool:
            return await keeper.stored_count() == 0 and await peer.stored_count() == 0

        await asyncio.wait_for(until(peer_has_it), HANG_GUARD)  # republished
        clock.now += 61
        await asyncio.wait_for(until(both_forgot), HANG_GUARD)  # swept
    finally:
        await keeper.close()
        await peer.close()


async def test_a_node_restarted_on_redis_serves_what_it_held(
    sites: Sites, redis_server: RedisServer
) -> None:
    aor = "sip:mallory@example.com"
    binding = bind(sites.paris, aor, "sip:mallory@10.0.0.4", site="paris")
    other = DhtNode(MemoryRecordStore(sites.trust), sites.trust, key=sites.tokyo)
    store = RedisRecordStore(redis_server.url, sites.trust)
    salt = b"restarts"
    node = DhtNode(store, sites.trust, key=sites.paris, salt=salt)
    restarted: DhtNode | None = None
    try:
        await other.listen("127.0.0.1", 0)
        await node.listen("127.0.0.1", 0)
        await node.bootstrap([other.address])
        assert await other.put(aor, [binding]) == 2
        await node.close()
        await store.close()
        store = RedisRecordStore(redis_server.url, sites.trust)
        restarted = DhtNode(store, sites.trust, key=sites.paris, salt=salt)  # the same id
        assert restarted.node_id == node.node_id
        await restarted.listen("127.0.0.1", 0)
        assert await restarted.stored_count() == 1
        assert await restarted.get(aor) == (binding,)  # no peers yet: the local copy
        await restarted.bootstrap([other.address])
        await other.close()  # the only other copy is gone
        assert await restarted.get(aor) == (binding,)
    finally:
        for n in (other, node, restarted):
            if n is not None:
                await n.close()
        await store.close()

"""A closed overlay: only nodes of trusted sites are heard, on real UDP sockets.

Eight nodes of two sites (four share each site key) on loopback. The attackers are a
plain ``kademlia.network.Server``, raw sockets, a p2psip node whose key nobody trusts,
and members that claim another node's id. Each test asserts what the attacker saw and
that the overlay's routing tables and records did not change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator

import pytest
import umsgpack
from kademlia.network import Server
from kademlia.node import Node

from dht_adaptor.keys import SiteKey, TrustStore, sign_binding
from dht_adaptor.membership import Member, open_datagram
from dht_adaptor.node import DhtNode, DhtUnavailable
from dht_adaptor.record import DhtBinding, dht_key, encode_record, new_binding
from dht_adaptor.record_store import MemoryRecordStore

NODES = 8
RPC_TIMEOUT = 0.3
SILENCE = 0.5  # seconds a raw socket waits to be sure no answer comes
HANG_GUARD = 10.0
ALICE = "sip:alice@example.com"


@dataclasses.dataclass
class Keys:
    paris: SiteKey
    tokyo: SiteKey
    stranger: SiteKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(SiteKey.generate(), SiteKey.generate(), SiteKey.generate())


class Revocable(TrustStore):
    """A trust store whose keys can be withdrawn while nodes run (the real one reloads
    its folder; here a set of withdrawn key ids stands for that)."""

    def __init__(self, keys: list[SiteKey]) -> None:
        super().__init__({k.key_id: k.public_bytes for k in keys})
        self.withdrawn: set[str] = set()

    def public_bytes(self, kid: str) -> bytes | None:
        return None if kid in self.withdrawn else super().public_bytes(kid)

    def verify_signature(self, kid: str, data: bytes, signature: bytes) -> bool:
        return kid not in self.withdrawn and super().verify_signature(kid, data, signature)


@dataclasses.dataclass
class Overlay:
    nodes: list[DhtNode]
    stores: list[MemoryRecordStore]
    trusts: list[Revocable]
    alice: DhtBinding

    def peer_ports(self) -> set[int]:
        return {port for node in self.nodes for _, _, port in node.peers()}

    def refused(self, reason: str) -> int:
        return sum(int(n.stats()[f"refused_{reason}"]) for n in self.nodes)

    def store_counts(self) -> list[tuple[int, int]]:
        return [(s.accepted, s.rejected) for s in self.stores]

    def holders(self, aor: str) -> int:
        return sum(1 for s in self.stores if dht_key(aor) in s._held)


def bind(key: SiteKey, aor: str, contact: str) -> DhtBinding:
    unsigned = new_binding(
        aor=aor, contact=contact, home="sip:proxy.example.com", site="paris",
        version=1, now=time.time(), expires=3600,
    )  # fmt: skip
    return sign_binding(unsigned, key)


@pytest.fixture
async def overlay(keys: Keys) -> AsyncIterator[Overlay]:
    built = Overlay([], [], [], bind(keys.paris, ALICE, "sip:alice@10.0.0.1"))
    try:
        for i in range(NODES):
            trust = Revocable([keys.paris, keys.tokyo])  # each node its own, like sites
            store = MemoryRecordStore(trust)
            key = (keys.paris, keys.tokyo)[i % 2]
            node = DhtNode(store, trust, key=key, rpc_timeout=RPC_TIMEOUT)
            await node.listen("127.0.0.1", 0)
            if built.nodes:
                assert await node.bootstrap([built.nodes[0].address]) >= 1
            built.nodes.append(node)
            built.stores.append(store)
            built.trusts.append(trust)
        await asyncio.gather(*(n.bootstrap([built.nodes[-1].address]) for n in built.nodes))
        assert await built.nodes[3].put(ALICE, [built.alice]) == NODES
        yield built
    finally:
        for node in built.nodes:
            await node.close()


async def silence(sock: socket.socket) -> bytes | None:
    """The first datagram ``sock`` receives within SILENCE seconds, or None."""
    sock.settimeout(SILENCE)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, sock.recv, 65536)
    except TimeoutError:
        return None


def plain(rpc: str, *args: object) -> bytes:
    """An rpcudp request as every stock kademlia node sends it."""
    return b"\x00" + os.urandom(20) + umsgpack.packb([rpc, list(args)])


async def test_a_plain_kademlia_node_cannot_join_read_or_store(overlay: Overlay) -> None:
    counts = overlay.store_counts()
    planted = "sip:planted@example.com"
    attacker = Server(ksize=20)
    await attacker.listen(0, interface="127.0.0.1")
    attacker.protocol._wait_timeout = RPC_TIMEOUT  # rpcudp waits 5 s
    port = attacker.transport.get_extra_info("sockname")[1]
    try:
        assert await attacker.bootstrap([n.address for n in overlay.nodes]) == []
        assert await attacker.get(ALICE) is None
        value = encode_record([bind(overlay_key(overlay), planted, "sip:evil@203.0.113.6")])
        answers = await asyncio.gather(
            *(
                attacker.protocol.call_store(Node(n.node_id, *n.address), dht_key(planted), value)
                for n in overlay.nodes
            )
        )
        assert [ok for ok, _ in answers] == [False] * NODES  # no node answered
    finally:
        attacker.stop()
    assert port not in overlay.peer_ports()
    assert overlay.holders(planted) == 0
    assert overlay.store_counts() == counts  # refused before reaching any store
    assert overlay.refused("no_proof") >= 2 * NODES  # its pings, stores (and lookups)
    for reader in overlay.nodes[::3]:
        assert await reader.get(ALICE) == (overlay.alice,)  # records unchanged


def overlay_key(overlay: Overlay) -> SiteKey:
    """A trusted site key: even a correctly signed record cannot come in by a non-member."""
    return overlay.nodes[0].member.key


async def test_raw_rpcudp_requests_get_no_answer(overlay: Overlay) -> None:
    target = overlay.nodes[0]
    requests = [
        plain("ping", os.urandom(20)),
        plain("find_node", os.urandom(20), os.urandom(20)),
        plain("find_value", os.urandom(20), dht_key(ALICE)),
        plain("store", os.urandom(20), dht_key(ALICE), b"x"),
        plain("stun"),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        for request in requests:
            sock.sendto(request, target.address)
        assert await silence(sock) is None  # the attacker saw nothing at all
    assert target.stats()["refused_no_proof"] == len(requests)
    assert port not in overlay.peer_ports()


async def test_a_node_with_an_untrusted_key_cannot_join_read_or_store(
    overlay: Overlay, keys: Keys
) -> None:
    counts = overlay.store_counts()
    planted = "sip:planted@example.com"
    # It trusts the overlay; the overlay does not trust it.
    trust = TrustStore({k.key_id: k.public_bytes for k in (keys.paris, keys.tokyo, keys.stranger)})
    stranger = DhtNode(MemoryRecordStore(trust), trust, key=keys.stranger, rpc_timeout=RPC_TIMEOUT)
    try:
        await stranger.listen("127.0.0.1", 0)
        assert await stranger.bootstrap([n.address for n in overlay.nodes]) == 0
        assert not await stranger.ping(overlay.nodes[1].address)
        with pytest.raises(DhtUnavailable):  # nobody answers: it reads nothing
            await stranger.get(ALICE)
        value = encode_record([bind(keys.paris, planted, "sip:evil@203.0.113.6")])
        protocol = stranger._protocol
        answers = await asyncio.gather(
            *(
                protocol.call_store(Node(n.node_id, *n.address), dht_key(planted), value)
                for n in overlay.nodes
            )
        )
        assert answers == [(False, None)] * NODES
        port = stranger.address[1]
    finally:
        await stranger.close()
    assert port not in overlay.peer_ports()
    assert overlay.holders(planted) == 0
    assert overlay.store_counts() == counts
    assert overlay.refused("untrusted_key") >= 2 * NODES
    assert overlay.refused("no_proof") == 0


async def test_sites_with_several_nodes_each_put_and_get(overlay: Overlay, keys: Keys) -> None:
    published = {}
    for i, node in enumerate(overlay.nodes):
        aor = f"sip:user{i}@example.com"
        published[aor] = bind(node.member.key, aor, f"sip:user{i}@10.0.1.{i}")
        assert await node.put(aor, [published[aor]]) >= NODES // 2
    for i, (aor, binding) in enumerate(published.items()):
        for reader in (overlay.nodes[(i + 1) % NODES], overlay.nodes[(i + 4) % NODES]):
            assert await asyncio.wait_for(reader.get(aor), HANG_GUARD) == (binding,)
    assert {n.member.key for n in overlay.nodes} == {keys.paris, keys.tokyo}
    assert len({n.node_id for n in overlay.nodes}) == NODES
    assert overlay.refused("datagrams") == 0


@pytest.mark.parametrize("site", ["same", "other"])
async def test_a_request_claiming_another_nodes_id_is_refused(
    overlay: Overlay, keys: Keys, site: str
) -> None:
    target, victim = overlay.nodes[0], overlay.nodes[2]  # both paris nodes
    impostor = Member(keys.paris if site == "same" else keys.tokyo, b"impostor")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.sendto(impostor.seal(plain("ping", victim.node_id), time.time()), target.address)
        assert await silence(sock) is None
        assert target.stats()["refused_wrong_node_id"] == 1
        # The same socket naming its own id is a member like any other, and answered.
        sock.sendto(impostor.seal(plain("ping", impostor.node_id), time.time()), target.address)
        answer = await silence(sock)
        assert answer is not None
        assert open_datagram(answer, overlay.trusts[0], time.time()).node_id == target.node_id
    table = {bytes.fromhex(nid): (host, p) for nid, host, p in target.peers()}
    assert table[victim.node_id] == victim.address  # not the impostor's
    assert table[impostor.node_id] == ("127.0.0.1", port)


async def test_an_answer_must_come_from_the_node_asked(overlay: Overlay) -> None:
    # A peer could list a made-up contact: a victim's id at an impostor's address. When
    # asked, the impostor answers as itself; it does not enter the table as the victim.
    asker, victim, impostor = overlay.nodes[0], overlay.nodes[2], overlay.nodes[5]
    protocol = asker._protocol
    made_up = Node(victim.node_id, *impostor.address)
    assert await protocol.call_ping(made_up) == (False, None)
    assert asker.stats()["other_node_answers"] == 1
    table = {bytes.fromhex(nid): (host, p) for nid, host, p in asker.peers()}
    assert table[victim.node_id] == victim.address
    assert table[impostor.node_id] == impostor.address
    assert not protocol.is_dead(impostor.address)  # someone lives there: no dead mark


async def test_a_key_withdrawn_from_trust_stops_working_at_once(
    overlay: Overlay, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    paris, tokyo = overlay.nodes[0], overlay.nodes[1]
    assert tokyo.member.key == keys.tokyo
    assert await tokyo.ping(paris.address)
    overlay.trusts[0].withdrawn.add(keys.tokyo.key_id)
    assert not await tokyo.ping(paris.address)  # the very next datagram
    assert paris.stats()["refused_untrusted_key"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"untrusted key {keys.tokyo.key_id}" in w for w in warnings), warnings
    overlay.trusts[0].withdrawn.clear()
    assert await tokyo.ping(paris.address)  # and back at once


async def test_refusals_are_counted_and_logged_once(
    overlay: Overlay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dht_adaptor.protocol")
    target = overlay.nodes[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(200):
            sock.sendto(plain("ping", os.urandom(20)), target.address)
        deadline = time.monotonic() + HANG_GUARD
        while target.stats()["refused_no_proof"] < 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name == "dht_adaptor.protocol"]
    assert len(lines) == 1 and lines[0].startswith(
        "refused 1 DHT datagram(s) (last: no membership proof from 127.0.0.1:"
    )
    assert target.stats()["refused_datagrams"] == 200

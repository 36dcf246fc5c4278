"""After a partition heals, a record written on the far side during the cut is found at
once, not after the dead-contact marks are probed. During the cut, a get that finds
nothing from fewer nodes than the read quorum says "unknown" (DhtUnavailable: the
proxy's 503), never "nobody": the user may be registered on the far side (issue 11).

An in-process overlay of eight nodes on loopback, cut in two halves by making each node
drop the datagrams it sends to the other half. During the cut a reader on the left sees
the right side time out (its dead marks), and bob registers on the right. Then the cut
heals and the reader looks bob up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dht_adaptor.errors import DhtUnavailable
from dht_adaptor.keys import SiteKey, TrustStore, sign_binding
from dht_adaptor.node import DhtNode
from dht_adaptor.record import dht_key, new_binding
from dht_adaptor.record_store import MemoryRecordStore

NODES = 8
RPC_TIMEOUT = 0.2
BOB = "sip:bob@example.com"


class Cut:
    """Which node addresses are on which side, and whether the link between is down."""

    def __init__(self) -> None:
        self.side: dict[tuple[str, int], int] = {}
        self.down = False

    def blocks(self, source: tuple[str, int], to: Any) -> bool:
        return self.down and self.side.get((to[0], to[1]), -1) != self.side[source]


class CutTransport:
    """A node's transport that drops what it sends across the cut while it is down."""

    def __init__(self, transport: Any, cut: Cut, address: tuple[str, int]) -> None:
        self._transport = transport
        self._cut = cut
        self._address = address

    def sendto(self, data: bytes, addr: Any) -> None:
        if not self._cut.blocks(self._address, addr):
            self._transport.sendto(data, addr)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._transport.get_extra_info(name, default)


@pytest.fixture
async def halves() -> AsyncIterator[tuple[list[DhtNode], list[DhtNode], Cut, SiteKey]]:
    paris, tokyo = SiteKey.generate(), SiteKey.generate()
    trust = TrustStore({k.key_id: k.public_bytes for k in (paris, tokyo)})
    cut = Cut()
    nodes: list[DhtNode] = []
    try:
        for i in range(NODES):
            key = (paris, tokyo)[i % 2]
            node = DhtNode(MemoryRecordStore(trust), trust, key=key, rpc_timeout=RPC_TIMEOUT)
            await node.listen("127.0.0.1", 0)
            protocol = node._protocol
            protocol.transport = CutTransport(protocol.transport, cut, node.address)
            cut.side[node.address] = 0 if i < NODES // 2 else 1
            if nodes:
                await node.bootstrap([nodes[0].address])
            nodes.append(node)
        await asyncio.gather(*(n.bootstrap([nodes[-1].address]) for n in nodes))
        assert all(len(n.peers()) == NODES - 1 for n in nodes)
        yield nodes[: NODES // 2], nodes[NODES // 2 :], cut, paris
    finally:
        for node in nodes:
            await node.close()


async def look_around(node: DhtNode) -> None:
    """A lookup that meets the far side's silence, then time for its RPCs to time out."""
    with pytest.raises(DhtUnavailable):  # half the closest nodes are silent: unknown
        await node.get("sip:nobody@example.com")
    await asyncio.sleep(RPC_TIMEOUT * 2)


@pytest.mark.parametrize("noticed_by", ["reader", "everyone"])
async def test_a_record_written_across_a_healed_cut_is_found_at_once(
    halves: tuple[list[DhtNode], list[DhtNode], Cut, SiteKey], noticed_by: str
) -> None:
    # "reader": only the reader saw the cut; the other left nodes still list the right
    # side (as the standalone dht nodes, which send nothing by themselves, do).
    # "everyone": every left node dropped the right side; only the reader's own dead
    # marks remember it.
    left, right, cut, key = halves
    reader = left[0]
    cut.down = True
    await asyncio.gather(
        *(look_around(n) for n in (left if noticed_by == "everyone" else [reader]))
    )
    protocol = reader._protocol
    assert all(protocol.is_dead(n.address) for n in right)
    unsigned = new_binding(
        aor=BOB, contact="sip:bob@10.9.0.2", home="sip:proxy.tokyo.example.com",
        site="tokyo", version=1, now=time.time(), expires=3600,
    )  # fmt: skip
    bob = sign_binding(unsigned, key)
    assert await right[1].put(BOB, [bob]) >= 2  # the right side only
    assert [await n.store.get(dht_key(BOB), time.time()) for n in left] == [()] * len(left)
    cut.down = False

    assert await reader.get(BOB) == (bob,)  # the first get after the heal
    assert reader.stats()["get_retries"] == 1
    assert not any(protocol.is_dead(n.address) for n in right)  # heard from again
    assert await left[1].get(BOB) == (bob,)


async def test_no_retry_while_nothing_is_known_dead(
    halves: tuple[list[DhtNode], list[DhtNode], Cut, SiteKey],
) -> None:
    left, _, _, _ = halves
    assert await left[0].get("sip:nobody@example.com") == ()
    assert left[0].stats()["get_retries"] == 0


async def test_a_get_during_the_cut_retries_once_and_ends(
    halves: tuple[list[DhtNode], list[DhtNode], Cut, SiteKey],
) -> None:
    # While the far side is really gone, the retry costs one more lookup, not more, and
    # "nobody" from half the nodes is not believed.
    left, _, cut, _ = halves
    cut.down = True
    await look_around(left[0])
    started = time.monotonic()
    with pytest.raises(DhtUnavailable, match="needed to say there is none"):
        await left[0].get("sip:nobody@example.com")
    assert left[0].stats()["get_retries"] == 1  # (look_around had nothing marked dead yet)
    assert left[0].stats()["gets_unknown"] == 2
    assert time.monotonic() - started < 5 * RPC_TIMEOUT

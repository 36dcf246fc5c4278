"""The iterative lookup of a DHT node (Kademlia paper §2.3), for find_node and find_value.

:class:`IterativeLookup` replaces kademlia's ``SpiderCrawl`` classes. It builds on
kademlia's ``NodeHeap`` (``push``, ``remove``, ``mark_contacted``, ``get_uncontacted``,
iteration), which ``tests/dht/test_engine_contract.py`` guards.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from kademlia.node import Node, NodeHeap

from dht_adaptor.protocol import NodeProtocol, Spawn

__all__ = ["IterativeLookup"]


class IterativeLookup:
    """An iterative lookup keeping ``alpha`` RPCs in flight (Kademlia paper §2.3).

    kademlia's SpiderCrawl works in rounds of alpha RPCs and waits for the slowest, so a
    dead contact stalls the round for a full timeout. Here a slow contact holds one slot
    for at most ``protocol.patience()`` (a few round-trip times): then it is set aside as
    a straggler, and the next candidate is asked. A straggler that answers before the
    lookup ends is taken back; one that times out is evicted as usual, in the background.

    The lookup ends when each of the k closest nodes heard of has answered or been set
    aside. A find_value lookup does not stop at the first value: every value is kept
    (records merge), in ``values`` by node id, still untrusted.

    Contacts known to be dead (``protocol.is_dead``) that answers name are left out and
    kept in ``skipped``; with ``revive`` they are asked after all. Their dead marks stay
    until they answer: one that is still dead times out, and its confirmation evicts it.
    """

    def __init__(
        self,
        protocol: NodeProtocol,
        target: Node,
        peers: list[Node],
        ksize: int,
        alpha: int,
        spawn: Spawn,
        *,
        revive: bool = False,
    ) -> None:
        self._protocol = protocol
        self._revive = revive
        self._target = target
        self._alpha = alpha
        self._spawn = spawn
        self.nearest = NodeHeap(target, ksize)
        self.nearest.push(peers)
        # Every node id heard of (asked, listed, skipped): how many nodes the key's
        # k closest could be, for the quorums (DhtNode.put and get).
        self.heard: set[bytes] = {bytes(p.id) for p in peers}
        # Failed nodes and stragglers, kept out of ``nearest`` even when later answers list
        # them again (kademlia's NodeHeap would take them back, already "contacted", and
        # return dead nodes as the closest: a put then waited for their timeouts).
        self._out: set[bytes] = set()
        self.answered = 0
        self.values: dict[bytes, object] = {}
        self.skipped: dict[bytes, Node] = {}  # known-dead contacts left out, by node id

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
                task = self._spawn(call(peer, self._target, revive=self._revive))
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
                    self.heard.update(bytes(n.id) for n in nodes)
                    self.nearest.push([n for n in nodes if self._admits(n)])
            now = loop.time()
            for task in [t for t in active if now - pending[t][1] >= patience]:
                active.discard(task)
                self._set_aside(pending[task][0])

    def _admits(self, node: Node) -> bool:
        if node.id in self._out:
            return False
        if not self._revive and self._protocol.is_dead((node.ip, node.port)):
            self.skipped[node.id] = node
            return False
        return True

    def _set_aside(self, peer: Node) -> None:
        self._out.add(peer.id)
        self.nearest.remove([peer.id])

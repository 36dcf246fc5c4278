"""How many copies make a put stored, and how many answers make a get's "none" true.

Issue 11 found a put counted as stored when any one node took it, and a get that heard
only from nodes without the record answered "nobody" (the proxy's 404) for a registered
user. The rules here, with ``n`` the nodes that should hold a key (the k closest;
fewer in an overlay smaller than k):

* **k = 8 copies** (``DhtNode``'s default ``ksize``), as OpenDHT stores: at 20% of the
  nodes lost at once, all 8 copies of a record are gone with probability 0.2**8 =
  2.6e-6, and the adaptor repairs lost copies within its retry delays. kademlia's 20
  made every put 20 stores and every get 20+ find_value RPCs.
* **W = 3 copies acknowledge a put** (``write_quorum``), or all ``n`` if fewer. The
  put sends to all ``n`` at once (W only decides success), so a higher W would only
  turn slow or lost stores into failures; the adaptor goes on repairing until all
  ``n`` hold the record (:class:`Stored` says how many do).
* **R = n - W + 1 answers make "none" true**: a get that found nothing from fewer of
  the ``n`` closest nodes raises ``DhtUnavailable`` (503 with Retry-After), never a
  404. Because R + W > n, every acknowledged put shares a node with every read of R
  answers: **two sites' bindings of one user are both found** by any get that hears
  from R of the n nodes, since a get asks all of them and merges every answer. For
  n = 8 that is 6 answers, which the lookup gets from the 8 closest alive nodes even
  with 20% of the overlay gone (it asks further nodes in place of dead ones).

In a cut overlay the side that reaches fewer than R of a key's nodes answers 503 for
users it cannot see, and still takes writes (W = 3 of its side): registrations go on,
and the far side's records are found once the cut heals.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_KSIZE", "DEFAULT_WRITE_QUORUM", "Quorum", "Stored"]

DEFAULT_KSIZE = 8
DEFAULT_WRITE_QUORUM = 3


@dataclass(frozen=True, slots=True)
class Quorum:
    """The quorums for a key whose ``replicas`` closest nodes should hold it."""

    replicas: int  # n: min(k, the nodes that could be among the k closest)
    write: int  # W
    read: int  # R = n - W + 1

    @classmethod
    def of(cls, ksize: int, write_quorum: int, nodes: int) -> Quorum:
        """The quorums when ``nodes`` nodes (ourselves included) could hold the key."""
        replicas = max(1, min(ksize, nodes))
        write = max(1, min(write_quorum, replicas))
        return cls(replicas, write, replicas - write + 1)


class Stored(int):
    """How many nodes hold a put's record (an int), and how many should (``wanted``)."""

    wanted: int

    def __new__(cls, copies: int, wanted: int) -> Stored:
        self = super().__new__(cls, copies)
        self.wanted = wanted
        return self

    @property
    def complete(self) -> bool:
        """Every node that should hold the record does."""
        return int(self) >= self.wanted

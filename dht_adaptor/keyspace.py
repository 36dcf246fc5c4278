"""The keys a node holds, ordered by id: which of them a new contact may need.

Kademlia (paper §2.5) sends a new contact the records for which it is now among the k
closest nodes. kademlia 2.2.3 (and this project until issue 11) decided that by walking
*every* stored record for every new contact: at 500 records a node, most of a put's
CPU went there. :class:`KeyIndex` keeps the stored keys as a sorted list of integers so
that only the keys in a range around the newcomer are looked at.

**Which range.** In the XOR metric the keys within distance ``d`` of an id ``c`` are not
an interval, but they lie in the aligned block of ``2**b`` ids that contains ``c``, where
``b = d.bit_length()``: the ids that share ``c``'s top ``160 - b`` bits. A node ``C``
becomes one of the k closest to key ``K`` only if fewer than k known nodes are nearer to
``K`` than ``C`` is. Let ``D`` be the distance from ``C`` to the k-th closest node we know
(ourselves included). Those k nodes and ``C`` lie in ``C``'s block of ``2**D.bit_length()``
ids. For a key outside that block, the block we know around the *key* holds as many
nodes as the one around ``C`` does (node ids are uniform, and the keys we hold are in
our own neighbourhood, where the routing table is complete): all of them are nearer to
the key than ``C``. So the keys worth looking at are those in ``C``'s block, widened by
:data:`SLACK_BITS` for the unevenness of real id spreads, and each is then checked
exactly against the routing table. A key missed by this bound is not lost: the adaptor
repairs its records to full copies, gets repair what they read, and republishing
re-stores.

That bound alone would look at every key we hold whenever a contact arrives whose id
shares a prefix with ours (its block then contains our whole neighbourhood). A second
bound, exact by the triangle inequality of XOR (``d(a, c) <= d(a, b) + d(b, c)``),
removes those: with ``rho`` the distance from us to our own k-th closest known node,
every key ``K`` has k known nodes within ``d(K, us) + rho``, so ``C`` can be among its
k closest only if ``d(C, K) < d(K, us) + rho``, and since ``d(C, K) >= d(C, us) -
d(K, us)``, only if ``d(K, us) > (d(C, us) - rho) / 2``: the keys of our own block of
that size are left out (:func:`hole_bits`). A contact far from us looks at no key near
us, which is where the keys we hold are.

The work per new contact is then the keys the newcomer should hold (what has to move,
summed over the nodes that send), not the keys this node holds. Pure data, no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

__all__ = ["ID_BITS", "SLACK_BITS", "KeyIndex", "block_bits", "hole_bits"]

ID_BITS = 160
SLACK_BITS = 1  # one more bit: the block twice as large (see the module docstring)


def block_bits(distance: int, slack: int = SLACK_BITS) -> int:
    """The size (in bits) of the aligned block around an id that holds every id within
    ``distance`` of it, widened by ``slack`` bits; at most :data:`ID_BITS`."""
    return min(ID_BITS, max(0, distance).bit_length() + slack)


def hole_bits(contact_distance: int, rho: int) -> int:
    """The size (in bits) of the aligned block around our own id none of whose keys a
    contact at ``contact_distance`` from us can need, with ``rho`` the distance to our
    k-th closest known node (see the module docstring); -1 if there is none."""
    if contact_distance <= rho:
        return -1
    return ((contact_distance - rho) // 2).bit_length() - 1


class KeyIndex:
    """Stored keys (20-byte ids) as sorted integers, with the time each was last stored.

    A superset of what the store holds is fine: a key whose record expired stays until
    someone looks at it and finds nothing (:meth:`discard`).
    """

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._stored: dict[int, float] = {}  # id -> when last stored (loop time)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and int.from_bytes(key, "big") in self._stored

    def add(self, key: bytes, when: float = 0.0) -> None:
        """Note that ``key`` is held, stored (by anyone) at ``when``."""
        value = int.from_bytes(key, "big")
        if value not in self._stored:
            bisect.insort(self._ids, value)
        self._stored[value] = max(when, self._stored.get(value, when))

    def discard(self, key: bytes) -> None:
        value = int.from_bytes(key, "big")
        if self._stored.pop(value, None) is not None:
            index = bisect.bisect_left(self._ids, value)
            del self._ids[index]

    def stored_at(self, key: bytes) -> float | None:
        """When ``key`` was last stored here, or None if it is not indexed."""
        return self._stored.get(int.from_bytes(key, "big"))

    def in_block(
        self, center: bytes, bits: int, hole: bytes | None = None, hole_size: int = -1
    ) -> Iterator[bytes]:
        """The indexed keys sharing ``center``'s top ``ID_BITS - bits`` bits (the aligned
        block of ``2**bits`` ids around it), in id order, except those of the block of
        ``2**hole_size`` ids around ``hole`` (none if ``hole_size`` < 0). A snapshot:
        changes to the index while iterating do not show."""
        low, high = _block(center, bits)
        ranges = [(low, high)]
        if hole is not None and hole_size >= 0:
            hole_low, hole_high = _block(hole, hole_size)
            ranges = [(low, min(high, hole_low)), (max(low, hole_high), high)]
        for start_id, stop_id in ranges:
            if start_id >= stop_id:
                continue
            start = bisect.bisect_left(self._ids, start_id)
            stop = bisect.bisect_left(self._ids, stop_id, start)
            for key in self._ids[start:stop]:
                yield key.to_bytes(20, "big")

    def __iter__(self) -> Iterator[bytes]:
        for key in list(self._ids):
            yield key.to_bytes(20, "big")


def _block(center: bytes, bits: int) -> tuple[int, int]:
    """[low, high) of the aligned block of ``2**bits`` ids around ``center``."""
    low = (int.from_bytes(center, "big") >> bits) << bits
    return low, low + (1 << bits)

"""Contacts that timed out, remembered until they are heard from again.

Issue 11 measured that after 20% of the nodes died, gets stayed at 110-125 ms with 2-6
RPC timeouts each, minutes later: a dead contact's mark lapsed after ``dead_ttl`` and
the next find_node answer that listed it (other nodes had not noticed yet) taught it
again. Here a mark lasts until a datagram from the address proves it alive; it is not
re-learnt from others' answers meanwhile (the lookup skips it, and our own find_node
answers leave it out). So that a node that comes back (a partition heals, a restart at
the same address) is not shunned for ever, a mark older than ``probe_after`` is
*probed*: the node pings it, at most a few at a time, and an answer clears the mark.

Bounded: at most ``max_entries`` marks (the oldest dropped first). Duck-typed contacts
(anything with ``.ip``, ``.port`` and ``.long_id``); time is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["DeadContacts"]

Address = tuple[str, int]
MAX_DEAD = 4096  # a lookup meets at most k per answer


@dataclass(slots=True)
class _Mark:
    since: float  # when it (last) timed out
    contact: Any
    probed: float  # when we last pinged it to see whether it is back


class DeadContacts:
    """Addresses that timed out, with their contacts (see the module docstring)."""

    def __init__(self, *, probe_after: float, max_entries: int = MAX_DEAD) -> None:
        self.probe_after = probe_after
        self._max = max_entries
        self._marks: dict[Address, _Mark] = {}  # oldest first

    def __len__(self) -> int:
        return len(self._marks)

    def __contains__(self, address: object) -> bool:
        return address in self._marks

    def mark(self, contact: Any, now: float) -> None:
        address = (contact.ip, contact.port)
        self._marks.pop(address, None)  # re-inserted: the dict stays oldest first
        while len(self._marks) >= self._max:
            self._marks.pop(next(iter(self._marks)))
        self._marks[address] = _Mark(now, contact, now)

    def clear(self, address: Address) -> bool:
        """It was heard from: forget the mark. True if there was one."""
        return self._marks.pop(address, None) is not None

    def since(self, address: Address) -> float | None:
        mark = self._marks.get(address)
        return None if mark is None else mark.since

    def near(self, target_long_id: int, k: int, *, newer_than: float = float("-inf")) -> list[Any]:
        """The ``k`` marked contacts closest to ``target_long_id``, nearest first."""
        found = [m.contact for m in self._marks.values() if m.since > newer_than]
        found.sort(key=lambda c: c.long_id ^ target_long_id)
        return found[:k]

    def to_probe(self, now: float, limit: int) -> list[Any]:
        """Up to ``limit`` contacts marked (or last probed) ``probe_after`` ago or more,
        oldest first; they count as probed now."""
        due: list[Any] = []
        for mark in self._marks.values():
            if len(due) >= limit:
                break
            if now - mark.probed >= self.probe_after:
                mark.probed = now
                due.append(mark.contact)
        return due

    def contacts(self) -> Iterable[Any]:
        return [m.contact for m in self._marks.values()]

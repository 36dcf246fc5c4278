"""Brute force stalls: failed digest authentications block their source for a while.

Free of I/O: the caller passes the time. Two kinds of block, so that an office of phones
behind one NAT address is not locked out by one phone with a wrong password:

* **(address, AOR)**: ``max_failures`` failures for one AOR from one address within
  ``window`` seconds block that pair (a password guesser hammering one user);
* **address**: ``SOURCE_FACTOR`` times ``max_failures`` failures from one address, for any
  AORs, block the address (a guesser spraying many users).

A block lasts ``block_time`` seconds, doubling each time the same key is blocked again
while it is remembered, up to ``block_max``. Tables are bounded: the oldest entries go.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

SOURCE_FACTOR = 4
MAX_ENTRIES = 50_000

Key = tuple[str, str]  # (address, AOR); the AOR is "" for the address's own entry


@dataclass(slots=True)
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    blocks: int = 0  # how many times blocked (the next block is twice as long)


@dataclass(frozen=True, slots=True)
class Block:
    """A new block, to log once and count."""

    address: str
    aor: str  # "" when the whole address is blocked
    seconds: float
    failures: int


class AuthLockout:
    def __init__(
        self,
        max_failures: int = 10,
        window: float = 300.0,
        block_time: float = 60.0,
        block_max: float = 3600.0,
        *,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        if max_failures < 1 or window <= 0 or block_time <= 0 or block_max < block_time:
            raise ValueError("bad lockout settings")
        self.max_failures = max_failures
        self.window = window
        self.block_time = block_time
        self.block_max = block_max
        self._max_entries = max_entries
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.blocks = 0  # blocks started
        self.refused = 0  # attempts refused while blocked

    def blocked(self, address: str, aor: str, now: float) -> bool:
        """Is this address, or this AOR from this address, blocked now? (Counts a refusal.)"""
        for key in ((address, ""), (address, aor)):
            entry = self._entries.get(key)
            if entry is not None and entry.blocked_until > now:
                self.refused += 1
                return True
        return False

    def failed(self, address: str, aor: str, now: float) -> Block | None:
        """Note a failed authentication; returns the block it starts, if any."""
        block = self._note((address, aor), self.max_failures, now)
        source = self._note((address, ""), SOURCE_FACTOR * self.max_failures, now)
        return source or block

    def succeeded(self, address: str, aor: str) -> None:
        """The right password: forget the pair's failures (not its block history)."""
        entry = self._entries.get((address, aor))
        if entry is not None:
            entry.failures.clear()

    def _note(self, key: Key, limit: int, now: float) -> Block | None:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        if entry.blocked_until > now:
            return None
        failures = entry.failures
        failures.append(now)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        while len(failures) > limit:
            failures.popleft()
        if len(failures) < limit:
            return None
        # A key blocked again soon after its last block gets twice as long; one that
        # stayed quiet for block_max starts over.
        if now > entry.blocked_until + self.block_max:
            entry.blocks = 0
        seconds = min(self.block_time * 2**entry.blocks, self.block_max)
        entry.blocks += 1
        entry.blocked_until = now + seconds
        count = len(failures)
        failures.clear()
        self.blocks += 1
        return Block(key[0], key[1], seconds, count)

    def __len__(self) -> int:
        return len(self._entries)

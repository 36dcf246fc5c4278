"""Per-source flood protection, like Kamailio's ``pike`` module: sans-IO, time passed in.

The transport asks :meth:`FloodGuard.admit` about every UDP datagram, every TCP frame
and every accepted TCP connection, before anything is parsed. A source (one remote IP
address) that sends more than ``max_requests`` messages within ``window`` seconds is
blocked for ``block_time`` seconds: everything it sends in that time is dropped without
an answer. When the block ends it starts again from zero; if it still floods, it is
blocked again within one window.

Answering must cost less than the request, and a blocked source gets no answer at all, so
its path through :meth:`admit` is the shortest: one dictionary lookup, one comparison and
one increment (``bench/udp_receive.py`` measures the whole per-datagram cost).

Both tables are bounded by ``max_sources``. The table of counting sources is kept in the
order their windows started (a source whose window restarts moves to the end), so the
expired ones are at the front: :meth:`tick` sweeps them, and a full table evicts its
oldest window first. The table of blocked sources is in block order, which is expiry
order since every block lasts as long; a full one evicts the block that ends first.
A spoofing attacker who fills the counting table can reset the count of a real
flooder, but never lift a block.

Addresses in :attr:`FloodGuard.exempt` are never blocked: the transport puts the
proxy's own listening address there. Only processes on this host can send from it (Linux
drops packets from outside that claim a local source address, ``accept_local=0``), and
local tools (a monitoring probe, a PBX on the same machine) are not an attack. Trusted
peers (``--trusted-peer``: a Kamailio edge, an ITSP) are never blocked either: all their
users' traffic comes from one address. The check happens only when a source would be
blocked, so it costs other sources nothing.

Logging is part of the decision, so it lives here too: one WARNING line per block (at
most ``LOG_BURST`` per interval, the rest counted in the summary), and one summary line
per ``log_interval`` while anything is being dropped.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

LOG_BURST = 10  # block lines per log interval; further blocks only in the summary
SUMMARY_SOURCES = 5  # sources named in a summary line


class FloodGuard:
    def __init__(
        self,
        max_requests: int,
        window: float,
        block_time: float,
        max_sources: int = 65536,
        *,
        log_interval: float = 60.0,
        trusted: Callable[[str], bool] | None = None,
    ) -> None:
        """``trusted``: sources never blocked either (``--trusted-peer``), asked only when
        one would be."""
        if max_requests < 1 or max_sources < 1 or window <= 0 or block_time <= 0:
            raise ValueError("max_requests and max_sources >= 1, window and block_time > 0")
        self.max_requests = max_requests
        self.window = window
        self.block_time = block_time
        self.max_sources = max_sources
        self.log_interval = log_interval
        self.exempt: set[str] = set()  # never blocked (the proxy's own addresses)
        self._trusted = trusted
        # host -> [window start, messages in this window], in window-start order
        self._sources: dict[str, list[float]] = {}
        # host -> [block end, messages dropped in this block], in block order
        self._blocked: dict[str, list[float]] = {}
        self.blocks = 0  # how many times a source was blocked
        self._dropped_ended = 0  # dropped during blocks that have ended
        # the current log interval
        self._interval_start: float | None = None
        self._interval_blocks = 0
        self._interval_dropped_base = 0
        self._interval_ended: dict[str, int] = {}  # blocks ended: host -> dropped (top few)

    # --- the per-message decision --------------------------------------------------------

    def admit(self, host: str, now: float) -> bool:
        """True if a message from ``host`` at ``now`` may be handled; False: drop it."""
        block = self._blocked.get(host)
        if block is not None:
            if now < block[0]:
                block[1] += 1
                return False
            self._unblock(host)
        rec = self._sources.get(host)
        if rec is None:
            if len(self._sources) >= self.max_sources:
                self._evict(now)
            self._sources[host] = [now, 1]
            return True  # max_requests >= 1
        if now - rec[0] >= self.window:
            # A new window: move to the end, keeping the table in window-start order.
            del self._sources[host]
            self._sources[host] = rec
            rec[0] = now
            rec[1] = 1
            return True
        rec[1] += 1
        if rec[1] <= self.max_requests:
            return True
        if host in self.exempt or (self._trusted is not None and self._trusted(host)):
            rec[1] = 0
            return True
        self._block(host, now)
        return False

    def blocked(self, host: str, now: float) -> bool:
        """Whether ``host`` is blocked at ``now`` (without counting a message)."""
        block = self._blocked.get(host)
        return block is not None and now < block[0]

    # --- counters ------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Messages dropped since the start (blocks still running included)."""
        return self._dropped_ended + sum(int(b[1]) for b in self._blocked.values())

    @property
    def sources(self) -> int:
        """Sources being counted now (not blocked)."""
        return len(self._sources)

    def blocked_sources(self, now: float, limit: int = 20) -> list[tuple[str, int]]:
        """Up to ``limit`` sources blocked at ``now``, most dropped first: (host, dropped)."""
        live = ((host, int(b[1])) for host, b in self._blocked.items() if now < b[0])
        # nsmallest, not a sort: called every second, with up to max_sources blocked.
        return heapq.nsmallest(limit, live, key=lambda item: (-item[1], item[0]))

    # --- housekeeping --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Forget expired windows and blocks; log the summary once per interval.

        Call it every second or so; nothing depends on it for correctness (``admit``
        treats expired entries as expired), it only keeps the tables small and the log
        informative."""
        sources = self._sources
        while sources:
            host, rec = next(iter(sources.items()))
            if now - rec[0] < self.window:
                break
            del sources[host]
        blocked = self._blocked
        while blocked:
            host, block = next(iter(blocked.items()))
            if now < block[0]:
                break
            self._unblock(host)
        if self._interval_start is None:
            self._interval_start = now
        elif now - self._interval_start >= self.log_interval:
            self._summarize(now)

    def _summarize(self, now: float) -> None:
        assert self._interval_start is not None
        dropped = self.dropped
        in_interval = dropped - self._interval_dropped_base
        if in_interval or self._interval_blocks:
            # The sources that dropped most, in blocks running now or ended in the interval
            # (counts of a block that spans intervals are its whole block's).
            top = dict(self._interval_ended)
            for host, n in self.blocked_sources(now, SUMMARY_SOURCES):
                top[host] = top.get(host, 0) + n
            named = sorted(top.items(), key=lambda item: (-item[1], item[0]))[:SUMMARY_SOURCES]
            log.warning(
                "flood: %d message(s) dropped and %d block(s) in the last %.0f s; "
                "%d source(s) blocked now; most dropped: %s",
                in_interval, self._interval_blocks, now - self._interval_start,
                len(self._blocked), ", ".join(f"{h} ({n})" for h, n in named) or "-",
            )  # fmt: skip
        self._interval_start = now
        self._interval_blocks = 0
        self._interval_dropped_base = dropped
        self._interval_ended.clear()

    # --- table upkeep --------------------------------------------------------------------

    def _block(self, host: str, now: float) -> None:
        del self._sources[host]
        blocked = self._blocked
        if len(blocked) >= self.max_sources:
            self._unblock(next(iter(blocked)))  # the block that ends first
        blocked[host] = [now + self.block_time, 1]
        self.blocks += 1
        self._interval_blocks += 1
        if self._interval_start is None:
            self._interval_start = now
        if self._interval_blocks <= LOG_BURST:
            log.warning(
                "flood: blocking %s for %.0f s: more than %d messages in %.0f s",
                host, self.block_time, self.max_requests, self.window,
            )  # fmt: skip

    def _unblock(self, host: str) -> None:
        dropped = int(self._blocked.pop(host)[1])
        self._dropped_ended += dropped
        ended = self._interval_ended  # kept to the few that dropped most
        ended[host] = ended.get(host, 0) + dropped
        if len(ended) > SUMMARY_SOURCES:
            del ended[min(ended, key=ended.__getitem__)]

    def _evict(self, now: float) -> None:
        sources = self._sources
        while sources:
            host, rec = next(iter(sources.items()))
            if now - rec[0] < self.window:
                break
            del sources[host]
        if len(sources) >= self.max_sources:
            del sources[next(iter(sources))]  # the oldest window goes first

"""The member sites as this site sees them: who they are, whether they answer.

Free of I/O: the caller passes the time. Sites are learnt from what the overlay says
(each binding names its home proxy, its site and the key that signed it); a prober
(:mod:`proxy.site_probe`) asks each home proxy for an answer every few seconds, and a
call that gets no answer at all from a home proxy counts too. A site that missed
``down_after`` answers in a row is unreachable until it answers again; calls whose only
home proxies are unreachable get a final answer at once instead of waiting for Timer B.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from .location import HomeBinding

log = logging.getLogger(__name__)

MAX_SITES = 1024  # a federation is its trust folder; more homes than this are junk
MAX_BINDINGS_SEEN = 100_000


@dataclass(slots=True)
class SiteState:
    home: str  # the home proxy's SIP URI (the key: one site may have several keys)
    site: str  # its name, as its bindings say
    key_id: str  # the key that signed its bindings
    last_heard: float | None = None  # wall clock of its last answer
    rtt: float | None = None  # seconds, of its last answer to a probe
    misses: int = 0  # answers missed in a row
    reachable: bool | None = None  # None: not asked yet
    bindings: dict[str, float] = field(default_factory=dict)  # contact -> expiry, seen

    def bindings_seen(self, now: float) -> int:
        return sum(1 for expiry in self.bindings.values() if expiry > now)


class SiteDirectory:
    def __init__(self, own_home: str, *, down_after: int = 2) -> None:
        self.own_home = own_home
        self.down_after = down_after
        self._sites: dict[str, SiteState] = {}

    def learn(self, bindings: Iterable[HomeBinding], now: float) -> None:
        """Bindings the overlay returned: note their sites and home proxies."""
        for b in bindings:
            if b.home == self.own_home or not b.is_live(now):
                continue
            state = self._sites.get(b.home)
            if state is None:
                if len(self._sites) >= MAX_SITES:
                    continue
                state = self._sites[b.home] = SiteState(b.home, b.site, b.key_id)
                log.info("member site %s (key %s) at %s", b.site, b.key_id, b.home)
            state.site, state.key_id = b.site, b.key_id
            if len(state.bindings) < MAX_BINDINGS_SEEN:
                state.bindings[b.contact] = b.expires_at

    def homes(self) -> list[str]:
        return list(self._sites)

    def answered(self, home: str, now: float, rtt: float | None = None) -> None:
        state = self._sites.get(home)
        if state is None:
            return
        if state.reachable is False:
            down_for = now - state.last_heard if state.last_heard is not None else 0.0
            log.warning("site %s at %s answers again (unreachable for %.0f s)",
                        state.site, home, down_for)  # fmt: skip
        state.last_heard = now
        state.misses = 0
        state.reachable = True
        if rtt is not None:
            state.rtt = rtt

    def missed(self, home: str, now: float, *, at_once: bool = False) -> None:
        """No answer from ``home`` (a probe, or a call: ``at_once`` marks it down now)."""
        state = self._sites.get(home)
        if state is None:
            return
        state.misses += 1
        if state.reachable is not False and (at_once or state.misses >= self.down_after):
            state.reachable = False
            log.warning("site %s at %s is unreachable (%d answer(s) missed)",
                        state.site, home, state.misses)  # fmt: skip

    def is_down(self, home: str) -> bool:
        state = self._sites.get(home)
        return state is not None and state.reachable is False

    def site_of(self, home: str) -> str:
        state = self._sites.get(home)
        return state.site if state is not None else home

    def sweep(self, now: float) -> None:
        """Forget expired bindings (the count shown is of live ones)."""
        for state in self._sites.values():
            state.bindings = {c: e for c, e in state.bindings.items() if e > now}

    def snapshot(self) -> list[SiteState]:
        return sorted(self._sites.values(), key=lambda s: (s.site, s.home))

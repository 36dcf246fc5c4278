"""This site's bindings as the proxy routes by them.

The location store holds the bindings; the directory adds what the registrar learnt on
the way, which the router needs: the flow each contact registered over (requests for it
go back there, so phones behind NAT stay reachable) and which AORs have registered here
(a call to one of them with no live binding gets 480, not 404).

It also keeps, in memory (a flow does not outlive the process), what RFC 5626 outbound
needs: which bindings were registered with outbound, so that they are reached over their
own flow and nothing else, and whether each such flow still works. The transport tells
(:class:`proxy.transport.FlowEvents`): a TCP connection that closed is a failed flow at
once; a UDP flow fails when no keep-alive came for its Flow-Timer and a grace period. A
request for a binding whose flow failed gets 430 (RFC 5626 §5.3) until the phone
registers again over a new flow.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .location import LocationStore
from .sip.auth import UserRecord
from .sip.binding import Binding
from .transport import Flow

log = logging.getLogger(__name__)

# RFC 5626 §4.4.1: the server waits longer than the Flow-Timer before it gives a flow
# up, for keep-alives delayed on the way (STUN retransmits a lost one within seconds).
FLOW_GRACE = 10.0
SWEEP_INTERVAL = 60.0  # seconds between sweeps of expired bindings from memory
# Contacts registered through the site's other worker processes (--workers), with their
# flows: the least recently told are forgotten past this many (a lookup finds them again).
MAX_LEARNT_FLOWS = 200_000


class KnownUsers(Protocol):
    def get(self, username: str) -> UserRecord | None: ...


@dataclass(slots=True)
class _OutboundFlow:
    heard: float  # monotonic: the REGISTER or keep-alive last seen on it
    users: int = 0  # outbound bindings over it
    closed: bool = False  # a stream flow whose connection is gone


class LocalDirectory:
    def __init__(
        self,
        store: LocationStore,
        users: KnownUsers | None,
        clock: Callable[[], float],
        *,
        udp_flow_timeout: float = 60.0 + FLOW_GRACE,
        monotonic: Callable[[], float] = time.monotonic,
        on_flow: Callable[[str, str], None] | None = None,
    ) -> None:
        """``udp_flow_timeout``: seconds of silence after which a UDP outbound flow has
        failed (its Flow-Timer plus a grace). ``on_flow(contact, flow)``: told when a
        contact is noted over a flow it was not known over (the other workers learn it,
        ``proxy.siblings``)."""
        self.store = store
        self._on_flow = on_flow
        self._users = users
        self._clock = clock
        self._monotonic = monotonic
        self._udp_flow_timeout = udp_flow_timeout
        # AORs seen registering: an INVITE to one of these with no binding gets 480, not 404.
        self.known_aors: set[str] = set()
        # contact URI -> flow of the REGISTER that bound it (for in-dialog requests via NAT).
        self.contact_flows: dict[str, str] = {}
        # The same for contacts registered through the site's other worker processes.
        self._learnt: OrderedDict[str, str] = OrderedDict()
        # This site's bindings as last registered, (AOR, contact) -> binding: what the NAT
        # keep-alives ping. Expired ones are swept out every SWEEP_INTERVAL.
        self.local: dict[tuple[str, str], Binding] = {}
        # RFC 5626: (AOR, contact) -> the flow it registered over with outbound.
        self._outbound: dict[tuple[str, str], str] = {}
        self._flows: dict[str, _OutboundFlow] = {}
        self._swept = 0.0

    async def lookup(self, aor: str) -> list[Binding]:
        """Live bindings of ``aor``; raises the store's LocationError."""
        bindings = await self.store.load(aor, self._clock())
        for b in bindings:
            if b.source:
                self.contact_flows[b.contact] = b.source
        return bindings

    def note(
        self,
        aor: str,
        old: Sequence[Binding],
        new: Sequence[Binding],
        *,
        outbound: str | None = None,
    ) -> None:
        """The bindings of ``aor`` changed from ``old`` to ``new``. ``outbound``: the
        contact of ``new`` that was just registered with RFC 5626 outbound."""
        self.known_aors.add(aor)
        kept = {b.contact: b for b in new}
        flows = self.contact_flows
        before = {b.contact: flows.get(b.contact) for b in new} if self._on_flow else {}
        for b in old:
            flows.pop(b.contact, None)
            if kept.get(b.contact) != b:  # gone, or registered again
                self._drop(aor, b.contact)
        for b in new:
            if b.source:
                flows[b.contact] = b.source
                if self._on_flow is not None and before.get(b.contact) != b.source:
                    self._on_flow(b.contact, b.source)
            self.local[(aor, b.contact)] = b
            if b.contact == outbound and b.source:
                self._bind_outbound(aor, b.contact, b.source)
        now = self._clock()
        if now - self._swept >= SWEEP_INTERVAL:
            self.sweep(now)

    def flow_of(self, contact: str) -> str | None:
        return self.contact_flows.get(contact) or self._learnt.get(contact)

    def learn_flow(self, contact: str, flow: str) -> None:
        """Another worker process of the site registered ``contact`` over ``flow``."""
        self._learnt[contact] = flow
        self._learnt.move_to_end(contact)
        if len(self._learnt) > MAX_LEARNT_FLOWS:
            self._learnt.popitem(last=False)

    def is_known(self, aor: str) -> bool:
        if aor in self.known_aors:
            return True
        if self._users is not None:
            user = aor.removeprefix("sip:").split("@")[0]
            return self._users.get(user) is not None
        return False

    # --- RFC 5626 outbound ----------------------------------------------------------

    def is_outbound(self, b: Binding) -> bool:
        """Was ``b`` registered with outbound, over the flow it names?"""
        return bool(b.source) and self._outbound.get((b.aor, b.contact)) == b.source

    def flow_failed(self, source: str) -> bool:
        """Has this outbound flow failed: its connection closed, or (UDP) no keep-alive
        for longer than the Flow-Timer and the grace?"""
        state = self._flows.get(source)
        if state is None:
            return False
        if state.closed:
            return True
        udp = source.startswith("udp:")
        return udp and self._monotonic() - state.heard > self._udp_flow_timeout

    def select(self, bindings: Sequence[Binding]) -> tuple[list[Binding], int]:
        """The bindings to fork a request to, and how many phones (instances) registered
        with outbound were left out because every flow of theirs failed.

        RFC 5626 §5.3: a phone registered with outbound over several flows (one reg-id
        each) gets the request once, over the flow registered last that still works;
        never over a failed one, nor to its Contact some other way.
        """
        out: list[Binding] = []
        best: dict[str, Binding] = {}
        dead: set[str] = set()
        for b in bindings:
            if b.instance is None or not self.is_outbound(b):
                out.append(b)
            elif self.flow_failed(b.source):
                dead.add(b.instance)
            elif (cur := best.get(b.instance)) is None or b.expires_at > cur.expires_at:
                best[b.instance] = b
        return out + list(best.values()), len(dead - best.keys())

    # FlowEvents, from the transport.

    def flow_closed(self, flow: Flow) -> None:
        state = self._flows.get(str(flow))
        if state is not None and not state.closed:
            state.closed = True
            log.info("outbound flow %s closed: its phone's calls get 430 until it registers "
                     "again", flow)  # fmt: skip

    def flow_heard(self, flow: Flow) -> None:
        state = self._flows.get(str(flow))
        if state is not None:
            state.heard = self._monotonic()

    # --- memory ---------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Forget bindings that expired without being removed."""
        self._swept = now
        for key, b in list(self.local.items()):
            if not b.is_live(now):
                del self.local[key]
                self._drop(*key)

    def _bind_outbound(self, aor: str, contact: str, flow: str) -> None:
        self._outbound[(aor, contact)] = flow
        state = self._flows.get(flow)
        if state is None:
            state = self._flows[flow] = _OutboundFlow(self._monotonic())
        state.heard = self._monotonic()
        state.users += 1

    def _drop(self, aor: str, contact: str) -> None:
        self.local.pop((aor, contact), None)
        flow = self._outbound.pop((aor, contact), None)
        if flow is None:
            return
        state = self._flows.get(flow)
        if state is not None:
            state.users -= 1
            if state.users <= 0:
                del self._flows[flow]

"""NAT keep-alives for phones without RFC 5626 outbound (like Kamailio's nathelper).

A phone behind NAT that registers over UDP is reachable only while its NAT keeps the
pinhole its REGISTER opened, which is often less than a minute when nothing crosses it;
phones refresh their registration far less often than that. So the proxy itself sends
an OPTIONS to every such binding's flow every ``interval`` seconds: the request and its
answer keep the pinhole open. Any answer counts, even 4xx or 5xx: the phone is there. A
binding whose phone leaves three of them in a row unanswered is removed, through the
registrar (so the DHT gets a tombstone), with an INFO line and the
``nat_bindings_removed`` counter.

Phones registered with outbound keep their flows alive themselves (STUN, CRLF) and are
left alone; so are bindings over TCP/TLS (the connection is the pinhole) and bindings
registered through another proxy (Path: that proxy's business).

The pings of one interval are spread over it in slices, so a site with many phones
sends a steady trickle, never a burst; past ``MAX_PINGS_PER_SECOND`` the round takes
longer than the interval instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from .directory import LocalDirectory
from .registrar_service import RegistrarService
from .sip.errors import SipError
from .sip.forwarding import ProxyIdentity, make_branch
from .sip.headers import Headers
from .sip.message import Request, Response
from .stats import SipCounters
from .transactions import Transactions
from .transport import Flow

log = logging.getLogger(__name__)

MISSES = 3  # unanswered keep-alives in a row that remove a binding
SLICE = 0.1  # seconds between the slices of a round
MAX_PINGS_PER_SECOND = 2000

Key = tuple[str, str, str]  # AOR, contact, flow


@dataclass(slots=True)
class _Ping:
    misses: int = 0  # keep-alives left unanswered in a row
    waiting: bool = False  # the last one has no answer yet


class NatKeepalive:
    def __init__(
        self,
        directory: LocalDirectory,
        transactions: Transactions,
        registrar: RegistrarService,
        identity: ProxyIdentity,
        counters: SipCounters,
        *,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._directory = directory
        self._transactions = transactions
        self._registrar = registrar
        self._me = identity
        self._counters = counters
        self._clock = clock
        self.interval = interval
        self._pings: dict[Key, _Ping] = {}
        # Pings waiting for their final answer or timeout (a dead phone's retransmits
        # for Timer F): not work a shutdown should wait for.
        self.inflight = 0

    def targets(self) -> list[Key]:
        """The bindings to ping now: live, over UDP, without outbound or Path."""
        now = self._clock()
        out = []
        for (aor, contact), b in self._directory.local.items():
            if (
                b.source.startswith("udp:")
                and not b.path
                and b.is_live(now)
                and not self._directory.is_outbound(b)
            ):
                out.append((aor, contact, b.source))
        return out

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            keys = self.targets()
            # Forget the bindings that went away meanwhile.
            self._pings = {k: self._pings.get(k, _Ping()) for k in keys}
            length = max(self.interval, len(keys) / MAX_PINGS_PER_SECOND)
            slices = max(1, int(length / SLICE))
            per_slice = max(1, math.ceil(len(keys) / slices))
            for n, first in enumerate(range(0, len(keys), per_slice)):
                await asyncio.sleep(max(0.0, start + n * length / slices - loop.time()))
                for key in keys[first : first + per_slice]:
                    await self.ping(key)
            await asyncio.sleep(max(0.0, start + length - loop.time()))

    async def ping(self, key: Key) -> None:
        """Count the last keep-alive of ``key`` as missed if unanswered, then remove the
        binding (after MISSES in a row) or send the next one."""
        state = self._pings.setdefault(key, _Ping())
        if state.waiting:
            state.misses += 1
            if state.misses >= MISSES:
                del self._pings[key]
                await self._remove(key)
                return
        _aor, contact, source = key
        try:
            flow = Flow.parse(source)
        except ValueError:
            return
        state.waiting = True
        self.inflight += 1
        done = False

        def finished() -> None:
            nonlocal done
            if not done:
                done = True
                self.inflight -= 1

        def answered(resp: Response) -> None:
            state.waiting = False
            state.misses = 0
            if resp.status >= 200:
                finished()

        self._counters.nat_keepalives_sent += 1
        self._transactions.start_client(self._options(contact, flow), flow, answered, finished)

    async def _remove(self, key: Key) -> None:
        aor, contact, source = key
        try:
            removed = await self._registrar.remove(aor, contact, source=source)
        except SipError as exc:  # the store (LocationError) or the DHT refused
            log.warning("cannot remove %s at %s after %d unanswered keep-alives: %s",
                        aor, contact, MISSES, exc)  # fmt: skip
            return
        if removed:
            self._counters.nat_bindings_removed += 1
            log.info("removed %s at %s: %d keep-alives to %s in a row unanswered",
                     aor, contact, MISSES, source)  # fmt: skip

    def _options(self, contact: str, flow: Flow) -> Request:
        me = self._me
        host = me.host  # as URIs write it: an IPv6 address is in brackets already
        headers = Headers()
        headers.add("Via", me.via(flow.transport, make_branch("nat", secrets.token_hex(8))))
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<sip:p2psip@{host}:{me.port}>;tag={secrets.token_hex(4)}")
        headers.add("To", f"<{contact}>")
        headers.add("Call-ID", f"{secrets.token_hex(10)}@{me.host}")
        headers.add("CSeq", "1 OPTIONS")
        headers.add("Content-Length", "0")
        return Request("OPTIONS", contact, headers)

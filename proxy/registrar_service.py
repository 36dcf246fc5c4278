"""REGISTER handling around the sans-IO registrar: auth, per-AOR locking, the store, and
publishing every change to the overlay."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .auth_gate import AuthGate
from .directory import LocalDirectory
from .location import BindingPublisher
from .sip.binding import Binding
from .sip.errors import Forbidden, SipError
from .sip.forwarding import ProxyIdentity
from .sip.registrar import RegistrarConfig, process_register, register_aor
from .sip.uri import SipUri
from .stats import SipCounters
from .transactions import ServerTx, Transactions

log = logging.getLogger(__name__)


class RegistrarService:
    def __init__(
        self,
        config: RegistrarConfig,
        *,
        identity: ProxyIdentity,
        directory: LocalDirectory,
        transactions: Transactions,
        auth: AuthGate,
        publisher: BindingPublisher[Any] | None,
        counters: SipCounters,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self._me = identity
        self._directory = directory
        self._store = directory.store
        self._transactions = transactions
        self._auth = auth
        self._publisher = publisher
        self._counters = counters
        self._clock = clock
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # AOR -> (lock, users)

    @asynccontextmanager
    async def _locked(self, aor: str) -> AsyncIterator[None]:
        """One change of an AOR at a time (REGISTERs of one phone may overlap).

        The lock is dropped when nobody holds or waits for it. Not when it is merely
        unlocked: a released lock stays unlocked until the waiter it woke runs, and a
        REGISTER arriving meanwhile would get a new lock and run beside that waiter.
        """
        lock, users = self._locks.get(aor, (asyncio.Lock(), 0))
        self._locks[aor] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[aor]
            if users == 1:
                del self._locks[aor]
            else:
                self._locks[aor] = (lock, users - 1)

    async def republish_all(self) -> int:
        """Queue every AOR of the local store for the DHT (at start-up: after a restart
        the store, e.g. Redis, still holds bindings the overlay may have lost)."""
        if self._publisher is None:
            return 0
        now = self._clock()
        count = 0
        async for aor in self._store.aors():
            bindings = await self._store.load(aor, now)
            if not bindings:
                continue
            self._directory.note(aor, (), bindings)
            try:
                self._publisher.publish(self._publisher.prepare(aor, bindings, force=True))
                count += 1
            except SipError as exc:
                log.error("cannot publish %s: %s", aor, exc)
        if count:
            log.info("queued %d AOR(s) of the local store for the DHT", count)
        return count

    async def handle(self, stx: ServerTx) -> None:
        """Answer a REGISTER. Raises SipError (the caller answers it)."""
        req = stx.request
        ruri = req.ruri
        to_me = isinstance(ruri, SipUri) and self._me.is_my_address(ruri)
        aor = register_aor(req, self.config, addressed_to_me=to_me)
        if self._auth.enabled:
            user = self._auth.authenticate(stx, proxy=False)
            if user is None:
                return  # challenged or refused
            to_uri = req.to.uri
            if not isinstance(to_uri, SipUri) or to_uri.user != user:
                raise Forbidden(f"{user!r} may not register {aor}")
        now = self._clock()
        async with self._locked(aor):
            current = await self._store.load(aor, now)
            outcome = process_register(
                req, current, now, self.config,
                source=str(stx.flow), to_tag=stx.to_tag, addressed_to_me=to_me,
            )  # fmt: skip
            if outcome.bindings is not None:
                await self._save(aor, current, outcome.bindings, now, outbound=outcome.outbound)
        if outcome.response.status == 200:
            self._counters.registers_ok += 1
            if outcome.bindings is None:
                log.debug("REGISTER %s from %s: refresh or query", aor, stx.flow)
        self._transactions.respond(stx, outcome.response)

    async def _save(
        self,
        aor: str,
        current: Sequence[Binding],
        new: Sequence[Binding],
        now: float,
        *,
        outbound: str | None = None,
    ) -> None:
        """Store the AOR's new bindings (the caller holds its lock) and publish them.
        ``outbound``: the contact just registered with RFC 5626 outbound.

        Signed and size-checked before the store is written: a record that cannot fit
        the DHT is refused now (403) rather than lost later.
        """
        publisher = self._publisher
        prepared = publisher.prepare(aor, new) if publisher is not None else None
        await self._store.save(aor, new, now)
        self._directory.note(aor, current, new, outbound=outbound)
        if prepared is not None and publisher is not None:
            publisher.publish(prepared)
        _log_change(aor, current, new, now)

    async def remove(
        self, aor: str, contact: str | None = None, *, source: str | None = None
    ) -> int:
        """Drop the binding of ``contact`` (every binding when None) of ``aor``: from the
        local store, and from the DHT with tombstones. Returns how many bindings went.
        ``source``: only while the binding is still the one registered over that flow
        (the NAT keep-alives remove what they found dead, never a newer registration).

        Raises the store's LocationError. The phone is unreachable until it registers
        again (a phone refreshing its registration comes back, as after an expiry).
        """
        now = self._clock()
        async with self._locked(aor):
            current = await self._store.load(aor, now)
            kept = tuple(
                b
                for b in current
                if contact is not None
                and (b.contact != contact or (source is not None and b.source != source))
            )
            removed = len(current) - len(kept)
            if removed:
                await self._save(aor, current, kept, now)
        return removed


def _log_change(aor: str, old: Sequence[Binding], new: Sequence[Binding], now: float) -> None:
    """One INFO line per change of who is reachable where (refreshes at DEBUG)."""
    before = {b.contact for b in old}
    after = {b.contact: b for b in new}
    added = [b for c, b in after.items() if c not in before]
    gone = sorted(before - after.keys())
    for b in added:
        log.info("registered %s at %s from %s for %ds", aor, b.contact, b.source or "?",
                 b.remaining(now))  # fmt: skip
    for c in gone:
        log.info("unregistered %s at %s", aor, c)
    if not added and not gone:
        log.debug("refreshed %s (%d binding(s))", aor, len(new))

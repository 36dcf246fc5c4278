"""REGISTER handling around the sans-IO registrar: auth, per-AOR locking, the store."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from dht_adaptor.adaptor import DhtAdaptor, TooManyBindings
from dht_adaptor.location import Binding, LocationError

from .sip.message import Request, make_response
from .sip.registrar import RegisterRejected, RegistrarConfig, process_register, register_aor
from .sip.uri import SipUri

if TYPE_CHECKING:
    from .server import ServerTx, SipServer

log = logging.getLogger(__name__)


class RegistrarService:
    def __init__(self, server: SipServer, users: Any | None) -> None:
        cfg = server.config
        self.server = server
        self.users = users
        self.config = RegistrarConfig(
            domains=cfg.domains,
            min_expires=cfg.min_expires,
            max_expires=cfg.max_expires,
            default_expires=cfg.default_expires,
            max_contacts=cfg.max_contacts,
        )
        self._locks: dict[str, asyncio.Lock] = {}
        # AORs seen registering: an INVITE to one of these with no binding gets 480, not 404.
        self.known_aors: set[str] = set()
        # contact URI -> flow of the REGISTER that bound it (for in-dialog requests via NAT).
        self.contact_flows: dict[str, str] = {}
        self.dht: DhtAdaptor | None = None

    def attach_dht(self, adaptor: DhtAdaptor) -> None:
        """Publish every change of bindings to the DHT from now on."""
        self.dht = adaptor

    async def republish_all(self) -> int:
        """Queue every AOR of the local store for the DHT (at start-up: after a restart
        the store, e.g. Redis, still holds bindings the overlay may have lost)."""
        if self.dht is None:
            return 0
        now = self.server.clock()
        count = 0
        async for aor in self.server.store.aors():
            bindings = await self.server.store.load(aor, now)
            if not bindings:
                continue
            self.known_aors.add(aor)
            try:
                self.dht.publish(self.dht.prepare(aor, bindings, force=True))
                count += 1
            except TooManyBindings as exc:
                log.error("cannot publish %s", exc)
        if count:
            log.info("queued %d AOR(s) of the local store for the DHT", count)
        return count

    async def handle(self, stx: ServerTx) -> None:
        server = self.server
        req = stx.request
        ruri = req.ruri
        to_me = isinstance(ruri, SipUri) and server.proxy.me.is_my_address(ruri)
        try:
            aor = register_aor(req, self.config, addressed_to_me=to_me)
        except RegisterRejected as exc:
            server.respond(stx, make_response(req, exc.status, exc.reason, to_tag=stx.to_tag))
            return
        auth = server.proxy.auth
        if auth is not None:
            user = auth.authenticate(stx, proxy=False)
            if user is None:
                return  # challenged or refused
            to_uri = req.to.uri
            if not isinstance(to_uri, SipUri) or to_uri.user != user:
                server.respond(stx, make_response(req, 403, "Forbidden", to_tag=stx.to_tag))
                return
        now = server.clock()
        lock = self._locks.setdefault(aor, asyncio.Lock())
        try:
            async with lock:
                current = await server.store.load(aor, now)
                outcome = process_register(
                    req,
                    current,
                    now,
                    self.config,
                    source=str(stx.flow),
                    to_tag=stx.to_tag,
                    addressed_to_me=to_me,
                )
                if outcome.bindings is not None:
                    # Signed and size-checked before the 200: a record that cannot fit
                    # the DHT is refused now rather than lost later.
                    prepared = self.dht.prepare(aor, outcome.bindings) if self.dht else None
                    await server.store.save(aor, outcome.bindings, now)
                    self._note(aor, current, outcome.bindings)
                    if prepared is not None and self.dht is not None:
                        self.dht.publish(prepared)
        except TooManyBindings as exc:
            log.warning("REGISTER %s refused: %s", aor, exc)
            server.respond(stx, make_response(req, exc.status_code, exc.reason, to_tag=stx.to_tag))
            return
        except LocationError as exc:
            log.error("REGISTER %s: location store failed: %s", aor, exc)
            server.respond(
                stx,
                make_response(
                    req,
                    503,
                    "Location Store Unavailable",
                    to_tag=stx.to_tag,
                    extra=[("Retry-After", "5")],
                ),
            )
            return
        finally:
            if not lock.locked() and self._locks.get(aor) is lock:
                del self._locks[aor]
        if outcome.response.status == 200:
            server.stats.inc("registers_ok")
        server.respond(stx, outcome.response)

    async def remove(self, aor: str, contact: str | None = None) -> int:
        """Drop the binding of ``contact`` (every binding when None) of ``aor``: from the
        local store, and from the DHT with tombstones. Returns how many bindings went.

        Raises the store's LocationError. The phone is unreachable until it registers
        again (a phone refreshing its registration comes back, as after an expiry).
        """
        server = self.server
        now = server.clock()
        lock = self._locks.setdefault(aor, asyncio.Lock())
        try:
            async with lock:
                current = await server.store.load(aor, now)
                kept = tuple(b for b in current if contact is not None and b.contact != contact)
                removed = len(current) - len(kept)
                if removed:
                    prepared = self.dht.prepare(aor, kept) if self.dht else None
                    await server.store.save(aor, kept, now)
                    self._note(aor, current, kept)
                    if prepared is not None and self.dht is not None:
                        self.dht.publish(prepared)
        finally:
            if not lock.locked() and self._locks.get(aor) is lock:
                del self._locks[aor]
        if removed:
            log.info("removed %d binding(s) of %s", removed, aor)
        return removed

    def _note(self, aor: str, old: list[Binding], new: tuple[Binding, ...]) -> None:
        self.known_aors.add(aor)
        for b in old:
            self.contact_flows.pop(b.contact, None)
        for b in new:
            if b.source:
                self.contact_flows[b.contact] = b.source

    async def lookup(self, aor: str) -> list[Binding]:
        bindings = await self.server.store.load(aor, self.server.clock())
        for b in bindings:
            if b.source:
                self.contact_flows[b.contact] = b.source
        return bindings

    def is_known(self, aor: str) -> bool:
        if aor in self.known_aors:
            return True
        if self.users is not None:
            user = aor.removeprefix("sip:").split("@")[0]
            return self.users.get(user) is not None
        return False


__all__ = ["RegistrarService", "Request"]

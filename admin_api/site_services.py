""":class:`SiteServices`: the admin API's :class:`~admin_api.services.AdminServices` over
a running site (its SIP server, location store, users, DHT adaptor and node)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dht_adaptor.location import LocationError
from proxy.sip.auth import UserRecord

from .services import (
    Check,
    DhtInfo,
    DhtView,
    InvalidInput,
    LatencyObserver,
    Lookup,
    NotFound,
    Peer,
    Registration,
    RegistrationPage,
    SiteStats,
    Unavailable,
    UserChange,
)

if TYPE_CHECKING:
    from dht_adaptor.adaptor import DhtAdaptor
    from dht_adaptor.node import DhtNode
    from proxy.server import SipServer
    from proxy.user_store import UserStore

MAX_AOR_CHARS = 512


@dataclass(eq=False)
class SiteServices:
    server: SipServer
    users_store: UserStore
    adaptor: DhtAdaptor
    node: DhtNode
    snapshot: Callable[[], Mapping[str, float]]  # proxy.app.site_stats of this site
    token: str
    require_peers: bool = True  # False for a site that starts the overlay (no --bootstrap)
    redis_ping: Callable[[], Awaitable[object]] | None = None
    lookup_timeout: float = 3.0
    _watchers: list[LatencyObserver] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.adaptor.latency_observer = self._observe

    @property
    def realm(self) -> str:
        return self.users_store.realm

    def now(self) -> float:
        return self.server.clock()

    def _observe(self, op: str, seconds: float, ok: bool) -> None:
        for watcher in self._watchers:
            watcher(op, seconds, ok)

    def watch_dht_latency(self, observer: LatencyObserver) -> None:
        self._watchers.append(observer)

    # --- health -----------------------------------------------------------------------

    async def readiness(self) -> Sequence[Check]:
        transport = self.server.transport
        checks = [
            Check("sip", True, f"listening on {transport.host}:{transport.port}")
            if transport.port
            else Check("sip", False, "not listening")
        ]
        peers = len(self.node.peers())
        if peers:
            checks.append(Check("dht", True, f"{peers} peer(s) in the routing table"))
        elif self.require_peers:
            checks.append(Check("dht", False, "no DHT peer yet (not joined)"))
        else:
            checks.append(Check("dht", True, "no --bootstrap: this node is the whole overlay"))
        if self.redis_ping is not None:
            try:
                await asyncio.wait_for(self.redis_ping(), 3.0)
                checks.append(Check("redis", True, "reachable"))
            except (LocationError, TimeoutError) as exc:
                checks.append(Check("redis", False, f"unreachable: {exc or 'timed out'}"))
        return checks

    # --- registrations ----------------------------------------------------------------

    def normalize_aor(self, text: str) -> str:
        from proxy.lookup import LookupError_, normalize_aor

        if not text.strip() or len(text) > MAX_AOR_CHARS:
            raise InvalidInput(f"not an address of record: {text[:80]!r}")
        try:
            return normalize_aor(text)
        except LookupError_ as exc:
            raise InvalidInput(str(exc)) from None

    async def registrations(self, prefix: str, after: str | None, limit: int) -> RegistrationPage:
        store = self.server.store
        now = self.server.clock()
        try:
            candidates = sorted(
                {
                    aor
                    async for aor in store.aors()
                    if _matches(aor, prefix) and (after is None or aor > after)
                }
            )
            items: list[Registration] = []
            for i, aor in enumerate(candidates):
                bindings = await store.load(aor, now)
                if bindings:
                    items.append(Registration(aor, tuple(bindings)))
                if len(items) == limit:
                    more = i + 1 < len(candidates)
                    return RegistrationPage(tuple(items), aor if more else None)
        except LocationError as exc:
            raise Unavailable(f"location store: {exc}") from None
        return RegistrationPage(tuple(items), None)

    async def registration(self, aor: str) -> Registration:
        try:
            bindings = await self.server.store.load(aor, self.server.clock())
        except LocationError as exc:
            raise Unavailable(f"location store: {exc}") from None
        return Registration(aor, tuple(bindings))

    async def dht_view(self, aor: str) -> DhtView:
        from dht_adaptor.node import DhtError

        try:
            found = await asyncio.wait_for(self.adaptor.lookup(aor), self.lookup_timeout)
        except (DhtError, TimeoutError) as exc:
            return DhtView(error=f"DHT lookup failed: {exc or 'timed out'}")
        return DhtView(found)

    async def remove_registration(self, aor: str, contact: str | None = None) -> int:
        try:
            removed = await self.server.registrar.remove(aor, contact)
        except LocationError as exc:
            raise Unavailable(f"location store: {exc}") from None
        if not removed:
            what = f"no binding {contact!r} of {aor}" if contact else f"no bindings of {aor}"
            raise NotFound(what)
        return removed

    # --- users ------------------------------------------------------------------------

    def users(self) -> Sequence[UserRecord]:
        return sorted(self.users_store, key=lambda r: r.username)

    def user(self, username: str) -> UserRecord | None:
        return self.users_store.get(username)

    async def save_user(self, change: UserChange) -> tuple[UserRecord, bool]:
        from proxy.user_store import UserStoreError

        if change.password is not None:
            record = UserRecord.from_password(change.username, self.realm, change.password)
        else:
            record = UserRecord(
                change.username,
                None if change.ha1_md5 is None else change.ha1_md5.lower(),
                None if change.ha1_sha256 is None else change.ha1_sha256.lower(),
            )
        try:
            created = await self.users_store.put(record)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        except UserStoreError as exc:
            raise Unavailable(str(exc)) from None
        return record, created

    async def delete_user(self, username: str) -> bool:
        from proxy.user_store import UserStoreError

        try:
            return await self.users_store.delete(username)
        except UserStoreError as exc:
            raise Unavailable(str(exc)) from None

    # --- the DHT ----------------------------------------------------------------------

    async def dht_info(self) -> DhtInfo:
        from dht_adaptor.node import DhtError
        from dht_adaptor.record_store import RecordStoreError

        try:
            host, port = self.node.address
            stored = await self.node.stored_count()
        except (DhtError, RecordStoreError) as exc:
            raise Unavailable(f"DHT node: {exc}") from None
        return DhtInfo(
            node_id=self.node.node_id_hex,
            host=host,
            port=port,
            site_id=self.adaptor.site_id,
            home=self.adaptor.home,
            key_id=self.adaptor.key.key_id,
            peers=tuple(Peer(i, h, p) for i, h, p in self.node.peers()),
            stored_records=stored,
        )

    async def dht_lookup(self, aor: str) -> Lookup:
        from dht_adaptor.node import DhtError

        rejected_before = self.node.stats()["rejected_on_get"]
        started = time.perf_counter()
        try:
            found = await asyncio.wait_for(self.adaptor.lookup(aor), self.lookup_timeout)
        except (DhtError, TimeoutError) as exc:
            raise Unavailable(f"DHT lookup of {aor} failed: {exc or 'timed out'}") from None
        seconds = time.perf_counter() - started
        rejected = int(self.node.stats()["rejected_on_get"] - rejected_before)
        return Lookup(aor, seconds, found, max(0, rejected))

    # --- statistics -------------------------------------------------------------------

    async def stats(self) -> SiteStats:
        snap = dict(self.snapshot())
        aors, bindings = await self._count_registrations()

        def n(key: str) -> int:
            return int(snap.get(key, 0))

        return SiteStats(
            requests=_by_suffix(snap, "requests_received."),
            responses_received=_by_suffix(snap, "responses_received."),
            responses_sent=_by_suffix(snap, "responses_sent."),
            server_transactions=len(self.server.server_txs),
            client_transactions=len(self.server.client_txs),
            registered_aors=aors,
            registered_bindings=bindings,
            users=len(self.users_store),
            registers_ok=n("registers_ok"),
            auth_failures=n("auth_failures"),
            parse_errors=n("parse_errors"),
            calls_routed_local=n("calls_routed_local"),
            calls_routed_dht=n("calls_routed_dht"),
            dht_retries=n("dht_retries"),
            dht_puts_ok=n("dht_puts_ok"),
            dht_puts_failed=n("dht_puts_failed"),
            dht_puts_skipped=n("dht_puts_skipped"),
            dht_gets_ok=n("dht_gets_ok"),
            dht_gets_failed=n("dht_gets_failed"),
            dht_backlog=n("dht_backlog"),
            dht_lookups=n("dht_lookups"),
            dht_cache_hits=n("dht_cache_hits"),
            dht_cache_misses=n("dht_cache_misses"),
            dht_peers=n("dht_node_peers"),
            dht_records_accepted=n("dht_node_accepted"),
            dht_records_rejected=n("dht_node_rejected"),
            dht_bindings_rejected_on_get=n("dht_node_rejected_on_get"),
            dht_rpc_timeouts=n("dht_node_rpc_timeouts"),
            counters=snap,
        )

    async def _count_registrations(self) -> tuple[int | None, int | None]:
        """AORs with live bindings and their bindings; None if the store cannot say."""
        store = self.server.store
        now = self.server.clock()
        aors = bindings = 0
        try:
            async for aor in store.aors():
                live = await store.load(aor, now)
                if live:
                    aors += 1
                    bindings += len(live)
        except LocationError:
            return None, None
        return aors, bindings


def _matches(aor: str, prefix: str) -> bool:
    return aor.startswith(prefix) or aor.removeprefix("sip:").startswith(prefix)


def _by_suffix(snap: Mapping[str, float], head: str) -> dict[str, int]:
    return {k[len(head) :]: int(v) for k, v in sorted(snap.items()) if k.startswith(head)}

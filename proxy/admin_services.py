""":class:`SiteServices`: the admin API's :class:`~admin_api.services.AdminServices` over
a running site (its location store, registrar, users, DHT adaptor and node).

The admin API defines the interface; this implementation lives beside the proxy, so that
``admin_api`` imports nothing of the site.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from admin_api.services import (
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
from dht_adaptor.adaptor import DhtAdaptor
from dht_adaptor.cached_store import CachedStore
from dht_adaptor.errors import DhtError
from dht_adaptor.node import DhtNode
from dht_adaptor.record_store import RecordStoreError

from .location import LocationError, LocationStore, LocationUnavailable
from .lookup import LookupError_, normalize_aor
from .registrar_service import RegistrarService
from .sip.auth import UserRecord
from .user_store import UserStore, UserStoreError

MAX_AOR_CHARS = 512


@dataclass(eq=False)
class SiteServices:
    sip_address: Callable[[], tuple[str, int]]  # where SIP listens (port 0: not yet)
    store: LocationStore
    registrar: RegistrarService
    users_store: UserStore
    adaptor: DhtAdaptor
    node: DhtNode
    snapshot: Callable[[], Mapping[str, float]]  # proxy.site.Site.stats
    transactions: Callable[[], tuple[int, int]]  # (server, client) transactions live
    token: str
    clock: Callable[[], float] = time.time
    require_peers: bool = True  # False for a site that starts the overlay (no --bootstrap)
    auth_enabled: Callable[[], bool] = lambda: False  # digest authentication is on

    @property
    def realm(self) -> str:
        return self.users_store.realm

    def now(self) -> float:
        return self.clock()

    def watch_dht_latency(self, observer: LatencyObserver) -> None:
        self.adaptor.watch_latency(observer)

    # --- health -----------------------------------------------------------------------

    async def readiness(self) -> Sequence[Check]:
        host, port = self.sip_address()
        checks = [
            Check("sip", True, f"listening on {host}:{port}")
            if port
            else Check("sip", False, "not listening")
        ]
        peers = len(self.node.peers())
        if peers:
            checks.append(Check("dht", True, f"{peers} peer(s) in the routing table"))
        elif self.require_peers:
            checks.append(Check("dht", False, "no DHT peer yet (not joined)"))
        else:
            checks.append(Check("dht", True, "no --bootstrap: this node is the whole overlay"))
        store = self.store
        if isinstance(store, CachedStore):
            held = f"{store.held} AOR(s) held in memory"
            if store.evicted:
                held += f", {store.evicted} dropped as memory was full"
            checks.append(
                await _redis_check(
                    store.ping,
                    ok=f"reachable; {held}",
                    failed=f"REGISTER answers 503, calls reach the {held}",
                )
            )
        checks.append(self._users_check())
        return checks

    def _users_check(self) -> Check:
        users = self.users_store
        if self.auth_enabled() and len(users) == 0:
            return Check(
                "users", False, "digest authentication is on and there are no users: "
                "every REGISTER is refused (add one with POST /users)",
            )  # fmt: skip
        if len(users) == 0:
            return Check("users", True, "no users: registration is open to anyone")
        return Check("users", True, f"{len(users)} user(s), digest authentication on")

    # --- registrations ----------------------------------------------------------------

    def normalize_aor(self, text: str) -> str:
        if not text.strip() or len(text) > MAX_AOR_CHARS:
            raise InvalidInput(f"not an address of record: {text[:80]!r}")
        try:
            return normalize_aor(text)
        except LookupError_ as exc:
            raise InvalidInput(str(exc)) from None

    async def registrations(self, prefix: str, after: str | None, limit: int) -> RegistrationPage:
        store = self.store
        now = self.clock()
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
            bindings = await self.store.load(aor, self.clock())
        except LocationError as exc:
            raise Unavailable(f"location store: {exc}") from None
        return Registration(aor, tuple(bindings))

    async def dht_view(self, aor: str) -> DhtView:
        try:
            found = await self.adaptor.lookup(aor)
        except LocationUnavailable as exc:
            return DhtView(error=str(exc))
        return DhtView(found)

    async def remove_registration(self, aor: str, contact: str | None = None) -> int:
        try:
            removed = await self.registrar.remove(aor, contact)
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
        try:
            return await self.users_store.delete(username)
        except UserStoreError as exc:
            raise Unavailable(str(exc)) from None

    # --- the DHT ----------------------------------------------------------------------

    async def dht_info(self) -> DhtInfo:
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
        rejected_before = self.node.stats()["rejected_on_get"]
        started = time.perf_counter()
        try:
            found = await self.adaptor.lookup(aor)
        except LocationUnavailable as exc:
            raise Unavailable(str(exc)) from None
        seconds = time.perf_counter() - started
        rejected = int(self.node.stats()["rejected_on_get"] - rejected_before)
        return Lookup(aor, seconds, found, max(0, rejected))

    # --- statistics -------------------------------------------------------------------

    async def stats(self) -> SiteStats:
        snap = dict(self.snapshot())
        aors, bindings = await self._count_registrations()
        server_txs, client_txs = self.transactions()

        def n(key: str) -> int:
            return int(snap.get(key, 0))

        return SiteStats(
            requests=_by_suffix(snap, "requests_received."),
            responses_received=_by_suffix(snap, "responses_received."),
            responses_sent=_by_suffix(snap, "responses_sent."),
            server_transactions=server_txs,
            client_transactions=client_txs,
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
        store = self.store
        now = self.clock()
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


async def _redis_check(
    ping: Callable[[], Awaitable[object]], *, ok: str, failed: str = ""
) -> Check:
    """Ask Redis now (3 s at most)."""
    try:
        await asyncio.wait_for(ping(), 3.0)
    except (LocationError, TimeoutError) as exc:
        detail = f"unreachable: {exc or 'timed out'}"
        return Check("redis", False, f"{detail}; {failed}" if failed else detail)
    return Check("redis", True, ok)


def _matches(aor: str, prefix: str) -> bool:
    return aor.startswith(prefix) or aor.removeprefix("sip:").startswith(prefix)


def _by_suffix(snap: Mapping[str, float], head: str) -> dict[str, int]:
    return {k[len(head) :]: int(v) for k, v in sorted(snap.items()) if k.startswith(head)}

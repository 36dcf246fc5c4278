""":class:`SiteServices`: the admin API's :class:`~admin_api.services.AdminServices` over
a running site (its location store, registrar, users, DHT adaptor and node).

The admin API defines the interface; this implementation lives beside the proxy, so that
``admin_api`` imports nothing of the site.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from admin_api.services import (
    Check,
    Conflict,
    DhtInfo,
    DhtView,
    Forbidden,
    InvalidInput,
    KeyEndorsement,
    KeyToTrust,
    LatencyObserver,
    Lookup,
    MemberSite,
    NotFound,
    Peer,
    Registration,
    RegistrationPage,
    SiteStats,
    Trust,
    TrustedKeyInfo,
    Unavailable,
    UserChange,
)
from dht_adaptor.adaptor import DhtAdaptor
from dht_adaptor.cached_store import CachedStore
from dht_adaptor.errors import DhtError
from dht_adaptor.keys import TrustStore
from dht_adaptor.node import DhtNode
from dht_adaptor.record_store import RecordStoreError
from dht_adaptor.trust_folder import (
    PUB_SUFFIX,
    SCOPE_SUFFIX,
    Endorsement,
    EndorsementError,
    KeyFileError,
    Scope,
    TrustedKey,
    files_of,
    key_id,
    load_public_key,
    public_pem,
    read_folder,
    remove_file,
    write_file,
)

from .location import LocationError, LocationStore, LocationUnavailable
from .lookup import LookupError_, normalize_aor
from .registrar_service import RegistrarService
from .sip.auth import UserRecord
from .sites import SiteDirectory
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
    member_sites: SiteDirectory = field(default_factory=lambda: SiteDirectory(""))

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
        node = self.node.stats()
        load = (
            f"; backlog: {self.adaptor.backlog} record(s) to write, "
            f"{int(node.get('backlog', 0))} node job(s); loop lag "
            f"{node.get('loop_lag', 0.0) * 1000:.0f} ms"
        )
        if peers:
            checks.append(Check("dht", True, f"{peers} peer(s) in the routing table{load}"))
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

    # --- trust ------------------------------------------------------------------------
    # Changes are files written into the trust folder (atomically), then the folder is
    # read again, as the watcher and SIGHUP read it: the folder stays the one truth.

    @property
    def _trust(self) -> TrustStore:
        return self.node.trust

    def trust(self) -> Trust:
        t = self._trust
        folder = None if t.folder is None else str(t.folder)
        return Trust(folder, t.error, tuple(_key_info(k) for k in t.entries()))

    async def trust_key(self, key: KeyToTrust) -> tuple[TrustedKeyInfo, bool]:
        trust = self._trust
        folder = self._writable_folder()
        try:
            scope = None if key.scope is None else Scope.parse(key.scope)
        except ValueError as exc:
            raise InvalidInput(f"scope: {exc}") from None
        kid = key_id(key.public_key)
        before = trust.get(kid)
        held = None
        if before is not None and before.file and before.file.endswith(PUB_SUFFIX):
            held = before.file.removesuffix(PUB_SUFFIX)
        name = key.name or held or kid
        if held is not None and held != name:
            raise Conflict(f"key {kid} is in {before.file if before else held} already; "
                           f"add it under the name {held!r}")  # fmt: skip
        pub, scope_file = folder / f"{name}{PUB_SUFFIX}", folder / f"{name}{SCOPE_SUFFIX}"
        with _writing(folder):
            if pub.exists() and load_public_key(pub) != key.public_key:
                raise Conflict(f"{pub.name} holds another key")
            # The scope first: a reload in between never sees the key allowed more than asked.
            if scope is None:
                remove_file(scope_file)
            else:
                write_file(scope_file, scope.text(), 0o644, overwrite=True)
            created = write_file(pub, public_pem(key.public_key), 0o644, overwrite=False)
            if not created and load_public_key(pub) != key.public_key:
                raise Conflict(f"{pub.name} holds another key (written meanwhile)")
            trust.load("admin API: key added")
        return _key_info(self._trusted(kid)), before is None

    async def trust_endorsed_key(self, endorsement: KeyEndorsement) -> tuple[TrustedKeyInfo, bool]:
        trust = self._trust
        folder = self._writable_folder()
        signer = trust.get(endorsement.old_key_id)
        if signer is None:
            raise Conflict(f"the endorsement is signed by key {endorsement.old_key_id}, which "
                           "this site does not trust")  # fmt: skip
        try:
            e = Endorsement.of(
                endorsement.old_key_id, endorsement.new_key_id,
                endorsement.new_public_key, endorsement.signature,
            )  # fmt: skip
        except EndorsementError as exc:
            raise Forbidden(f"the endorsement does not hold: {exc}") from None
        if not e.verify(signer.public_bytes):
            raise Forbidden(f"the endorsement is not signed by key {e.old_key_id}")
        before = e.new_key_id in trust
        with _writing(folder):
            write_file(folder / e.file_name, e.encode(), 0o644, overwrite=True)
            trust.load("admin API: key endorsed")
        return _key_info(self._trusted(e.new_key_id)), not before

    async def distrust_key(self, key_id: str) -> None:
        trust = self._trust
        key = trust.get(key_id)
        if key is not None and key.own:
            raise Conflict(f"key {key_id} is this site's own key; it cannot be removed")
        folder = self._writable_folder()
        if key is None:
            raise NotFound(f"key {key_id} is not trusted here")
        with _writing(folder):
            for path in files_of(folder, key_id, key):
                remove_file(path)  # a .pub before its .scope: never wider than before
            trust.load("admin API: key removed")
        if key_id in trust:
            raise Unavailable(f"key {key_id} is still trusted: a file in {folder} trusts it")

    def _writable_folder(self) -> Path:
        """The trust folder, if the site has one that reads cleanly (nothing is written to
        a folder with a bad file: the change would not count)."""
        folder = self._trust.folder
        if folder is None:
            raise Conflict(
                "this site has no trust folder (--trust DIR): its trust cannot change while it runs"
            )
        try:
            read_folder(folder)
        except KeyFileError as exc:
            raise Conflict(f"the trust folder has a bad file; nothing changed: {exc}") from None
        return folder

    def _trusted(self, kid: str) -> TrustedKey:
        key = self._trust.get(kid)
        if key is None:  # someone changed the folder meanwhile
            raise Unavailable(f"key {kid} was written to the trust folder but is not trusted")
        return key

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
            sites=self.sites(),
        )

    def sites(self) -> Sequence[MemberSite]:
        now = self.clock()
        return [
            MemberSite(
                site_id=s.site, home=s.home, key_id=s.key_id, reachable=s.reachable,
                last_heard=s.last_heard, rtt=s.rtt, bindings_seen=s.bindings_seen(now),
            )
            for s in self.member_sites.snapshot()
        ]  # fmt: skip

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


def _key_info(k: TrustedKey) -> TrustedKeyInfo:
    scope = None if k.scope is None else k.scope.patterns
    return TrustedKeyInfo(k.key_id, k.public_bytes, k.own, k.file, k.endorsed_by, scope)


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """A trust folder that cannot be written (or read back) is a 503 naming the file."""
    try:
        yield
    except KeyFileError as exc:
        raise Unavailable(f"trust folder {folder}: {exc}") from None


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

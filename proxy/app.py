"""Building and running one site from a Config: store, users, auth and the SIP server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dht_adaptor.adaptor import DhtAdaptor
from dht_adaptor.location import LocationError, LocationStore, MemoryStore
from dht_adaptor.node import DhtNode

from .config import Config
from .dht_routing import DhtRouter
from .server import SipServer

if TYPE_CHECKING:
    from admin_api.server import AdminServer
    from dht_adaptor.keys import SiteKey, TrustStore
    from dht_adaptor.record_store import RecordStore

    from .user_store import UserStore

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The site cannot start; the message is one line for the operator."""


def nonce_secret(data_dir: Path) -> bytes:
    """A per-site secret for digest nonces, kept so that restarts accept fresh nonces."""
    path = data_dir / "nonce.secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    secret = secrets.token_bytes(32)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex())
    except OSError as exc:
        log.warning("cannot keep the nonce secret in %s (%s); using a fresh one", path, exc)
    return secret


async def open_store(config: Config) -> LocationStore:
    if not config.redis_url:
        return MemoryStore()
    from dht_adaptor.redis_store import RedisStore

    try:
        store = RedisStore(config.redis_url)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    await _reach_redis(store.ping, store.close, LocationError)
    return store


async def _reach_redis(
    ping: Callable[[], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
    errors: type[Exception],
) -> None:
    """Redis may still be starting (docker-compose): wait a little before giving up."""
    for attempt in range(20):
        try:
            await ping()
            return
        except errors as exc:
            if attempt == 19:
                await close()
                raise StartupError(f"cannot reach Redis: {exc}") from None
            await asyncio.sleep(0.5)


async def build_auth(config: Config, server: SipServer) -> UserStore:
    """The site's users (Redis, or the users file) and digest authentication.

    Authentication is on when a users file was given or any user exists, and switches on
    by itself when the first user is added (through the admin API); it never switches
    off again while the site runs, so deleting every user does not open registration.
    """
    from .auth_gate import AuthGate
    from .user_store import UserStoreError, open_user_store
    from .users import UsersFileError

    realm = config.domains[0] if config.domains else "p2psip"
    try:
        users = await open_user_store(config, realm)
    except (UsersFileError, UserStoreError) as exc:
        raise StartupError(str(exc)) from None
    server.registrar.users = users
    gate = AuthGate(server, users, realm, nonce_secret(config.data_dir))

    def switch_on() -> None:
        if server.proxy.auth is None and (len(users) or config.users_file is not None):
            server.proxy.auth = gate
            log.info("digest authentication on for %d user(s), realm %r", len(users), realm)

    users.subscribe(switch_on)
    switch_on()
    if server.proxy.auth is None:
        log.warning("no users: registration is open to anyone (use --users FILE or the admin API)")
    return users


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT/SIGTERM; installed first, so a signal during start-up
    still means a clean stop (exit status 0), not death by the default handler."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve_until(stop: asyncio.Event, ready: asyncio.Event | None) -> None:
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping")


async def keep_joined(node: DhtNode, config: Config) -> None:
    """Join through the bootstrap nodes, then again every round.

    Not only when every peer is gone: after a long partition each half has evicted the
    other but still knows its own nodes, and would stay split for good. One ping per
    bootstrap address and a lookup of our own id every 30 s merge the halves again
    (tests/test_partition.py). Before the first answer (the bootstrap node may start
    after us, as in docker-compose) it tries every 2 s.
    """
    addrs = [(b.host, b.port) for b in config.bootstrap]
    joined = False
    while True:
        peers = await node.bootstrap(addrs)
        if peers and not joined:
            log.info("joined the overlay: %d peer(s) known", peers)
        elif not peers:
            log.warning("no DHT node answers (bootstrap %s)", ", ".join(map(str, config.bootstrap)))
        joined = peers > 0
        await asyncio.sleep(2.0 if not joined else 30.0)


async def open_dht(config: Config) -> tuple[DhtNode, SiteKey]:
    """This site's key, its trust list and a DHT node listening and joined to the overlay."""
    from dht_adaptor.keys import KeyFileError, SiteKey, TrustStore

    try:
        key = SiteKey.load_or_create(config.data_dir)
        trust = TrustStore.from_dir(config.trust_dir, key)
    except KeyFileError as exc:
        raise StartupError(str(exc)) from None
    records = await open_record_store(config, trust)
    node = DhtNode(records, trust, rpc_timeout=config.dht_rpc_timeout)
    listen = config.dht_listen
    try:
        port = await node.listen(listen.host, listen.port)
    except OSError as exc:
        await records.close()
        raise StartupError(f"cannot listen on {listen} (DHT): {exc.strerror or exc}") from None
    log.info(
        "DHT node %s on %s:%d, site key %s, %d trusted key(s)",
        node.node_id_hex[:12], listen.host, port, key.key_id, len(trust),
    )  # fmt: skip
    if not config.bootstrap:
        log.info("no --bootstrap: this node starts a new overlay")
    return node, key


@contextlib.asynccontextmanager
async def joined(node: DhtNode, config: Config) -> AsyncIterator[None]:
    """Keep ``node`` joined in the background (not blocking start-up) while inside."""
    task = (
        asyncio.get_running_loop().create_task(keep_joined(node, config))
        if config.bootstrap
        else None
    )
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def open_record_store(config: Config, trust: TrustStore) -> RecordStore:
    from dht_adaptor.record_store import MemoryRecordStore, RecordStoreError, RedisRecordStore

    if not config.redis_url:
        return MemoryRecordStore(trust)
    try:
        store = RedisRecordStore(config.redis_url, trust)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    await _reach_redis(store.ping, store.close, RecordStoreError)
    return store


async def run_dht(config: Config, ready: asyncio.Event | None = None) -> None:
    """``p2psip dht``: a standalone node that stores and serves records, nothing else."""
    stop = _stop_on_signals()
    node, _key = await open_dht(config)
    try:
        async with joined(node, config):
            await _serve_until(stop, ready)
    finally:
        await node.close()
        await node.store.close()


def site_stats(
    server: SipServer, adaptor: DhtAdaptor | None, node: DhtNode | None
) -> dict[str, float]:
    """One flat snapshot of the site's counters (logged; served by the admin API)."""
    out: dict[str, float] = dict(server.stats.snapshot())
    if adaptor is not None:
        out.update(adaptor.stats)
        out["dht_backlog"] = adaptor.backlog
    if node is not None:
        out.update({f"dht_node_{k}": v for k, v in node.stats().items()})
    router = server.proxy.dht
    if router is not None:
        cache = router.cache
        out["dht_cache_hits"] = cache.hits
        out["dht_cache_misses"] = cache.misses
        out["dht_cache_hit_rate"] = round(cache.hit_rate, 4)
    return out


async def log_stats_every(interval: float, stats: Callable[[], dict[str, float]]) -> None:
    while True:
        await asyncio.sleep(interval)
        log.info("stats: %s", json.dumps(stats(), sort_keys=True))


def home_uri(server: SipServer) -> str:
    """The SIP URI other sites reach this proxy at (the binding's home proxy)."""
    me = server.proxy.me
    host = f"[{me.host}]" if ":" in me.host else me.host
    return f"sip:{host}:{me.port}"


async def run_site(config: Config, ready: asyncio.Event | None = None) -> None:
    stop = _stop_on_signals()
    store = await open_store(config)
    server = SipServer(config, store)
    node: DhtNode | None = None
    adaptor: DhtAdaptor | None = None
    users: UserStore | None = None
    admin: AdminServer | None = None
    try:
        users = await build_auth(config, server)
        try:
            await server.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {config.sip_listen}: {exc.strerror or exc}"
            ) from None
        if not config.domains:
            log.warning("no --domain given: serving every domain name")
        node, key = await open_dht(config)
        adaptor = DhtAdaptor(
            node, key, site_id=config.site_id, home=home_uri(server),
            republish_interval=config.dht_republish,
        )  # fmt: skip
        server.registrar.attach_dht(adaptor)
        server.proxy.dht = DhtRouter(
            server.proxy, adaptor, adaptor.home,
            cache_ttl=config.dht_cache_ttl, lookup_timeout=config.dht_lookup_timeout,
        )  # fmt: skip
        adaptor.start()
        await server.registrar.republish_all()
        snapshot = functools.partial(site_stats, server, adaptor, node)
        admin = await start_admin(config, server, users, adaptor, node, snapshot)
        stats_task = asyncio.get_running_loop().create_task(log_stats_every(60.0, snapshot))
        try:
            async with joined(node, config):
                await _serve_until(stop, ready)
        finally:
            stats_task.cancel()
            log.info("stats: %s", json.dumps(snapshot(), sort_keys=True))
    finally:
        if admin is not None:
            await admin.stop()  # first: no admin request may reach a closed part
        await server.close()
        if adaptor is not None:
            await adaptor.close()
        if node is not None:
            await node.close()
            await node.store.close()
        if users is not None:
            await users.close()
        await store.close()


# --- the admin API (admin_api/): built from the site's parts, served in this loop ---------


def admin_token(config: Config) -> str:
    """``--admin-token``, or else this site's own random token, kept in
    ``DATA_DIR/admin.token`` (mode 0600): the API is never open without one."""
    if config.admin_token:
        return config.admin_token
    path = config.data_dir / "admin.token"
    with contextlib.suppress(OSError):
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    except OSError as exc:
        raise StartupError(f"cannot write the admin token to {path}: {exc.strerror}") from None
    log.info("no --admin-token: the admin API token is in %s", path)
    return token


async def start_admin(
    config: Config,
    server: SipServer,
    users: UserStore,
    adaptor: DhtAdaptor,
    node: DhtNode,
    snapshot: Callable[[], dict[str, float]],
) -> AdminServer:
    from admin_api.app import create_app
    from admin_api.server import AdminServer
    from admin_api.site_services import SiteServices

    redis_ping = None
    if config.redis_url:
        from dht_adaptor.redis_store import RedisStore

        if isinstance(server.store, RedisStore):
            redis_ping = server.store.ping
    services = SiteServices(
        server, users, adaptor, node, snapshot, admin_token(config),
        require_peers=bool(config.bootstrap), redis_ping=redis_ping,
        lookup_timeout=config.dht_lookup_timeout,
    )  # fmt: skip
    listen = config.admin_listen
    admin = AdminServer(create_app(services), listen.host, listen.port)
    try:
        await admin.start()
    except OSError as exc:
        reason = exc.strerror or exc
        raise StartupError(f"cannot listen on {listen} (admin API): {reason}") from None
    return admin

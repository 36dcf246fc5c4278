"""One function builds a site from a :class:`Config`: :func:`build_site`.

The CLI (``proxy.app``) and the tests use it alike. It opens the site's state (location
store, users, keys), binds the SIP sockets (so that every part is built knowing the
site's real address and port), starts the DHT node, and builds each part with the few
things it uses, in one place, leaves first::

    transport ─ transactions ─┬─ auth gate ──────────┐
                              ├─ registrar ──────────┤
    store ─ directory ────────┤                      ├─ server (ingress, dispatch)
    DHT node ─ adaptor ─ DHT router ─ router ─ forker┘
                                  └─ admin services (admin_api's interface)

Nothing is attached to a part after it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dht_adaptor.adaptor import RETRY_DELAYS, DhtAdaptor
from dht_adaptor.cached_store import CachedStore
from dht_adaptor.keys import KeyFileError, SiteKey, TrustStore
from dht_adaptor.location import MemoryStore
from dht_adaptor.node import DhtNode
from dht_adaptor.record_store import (
    MemoryRecordStore,
    RecordStore,
    RecordStoreError,
    RedisRecordStore,
)
from dht_adaptor.redis_store import RedisStore

from .admin_services import SiteServices
from .auth_gate import AuthGate, TrustedPeers
from .config import Config, tls_listen_of
from .dht_routing import DhtRouter
from .directory import FLOW_GRACE, LocalDirectory
from .dns import DnsLocator
from .failover import Failover
from .flood import FloodGuard
from .forker import Forker
from .location import LocationError, LocationStore
from .lockout import AuthLockout
from .nat_keepalive import NatKeepalive
from .overload import OverloadControl
from .registrar_service import RegistrarService
from .relay_auth import RelayVerifier
from .resolver import Resolver
from .router import Router
from .server import SipServer
from .siblings import Handlers, Siblings, WorkerPlan, quiet, worker_identity
from .sip.forwarding import ProxyIdentity
from .sip.message import ParseLimits
from .sip.registrar import RegistrarConfig
from .sip.timers import TimerConfig
from .sip.tokens import ProxyTokens
from .site_probe import SiteProber
from .sites import SiteDirectory
from .stats import SipCounters
from .tasks import Tasks
from .tls import PeerVerifier, TlsError, check_pair, endpoint, phone_certificate, site_certificate
from .transactions import TransactionLayer
from .transport import TransportLayer
from .user_store import RedisUserStore, UserStore, UserStoreError, open_user_store
from .users import UsersFileError
from .worker_dht import ChangePublisher, RemoteAdaptor, serve_locate

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The site cannot start; the message is one line for the operator."""


# --- state kept in the data directory -------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def nonce_secret(data_dir: Path) -> bytes:
    """A per-site secret for digest nonces, kept so that restarts accept fresh nonces."""
    path = data_dir / "nonce.secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    secret = secrets.token_bytes(32)
    try:
        _write_private(path, secret.hex())
    except OSError as exc:
        log.warning("cannot keep the nonce secret in %s (%s); using a fresh one", path, exc)
    return secret


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
        _write_private(path, token + "\n")
    except OSError as exc:
        raise StartupError(f"cannot write the admin token to {path}: {exc.strerror}") from None
    log.info("no --admin-token: the admin API token is in %s", path)
    return token


# --- opening the site's stores and its DHT node ---------------------------------------


async def _reach_redis(store: RedisStore | RedisRecordStore) -> None:
    """Redis may still be starting (docker-compose): wait a little before giving up."""
    for attempt in range(20):
        try:
            await store.ping()
            return
        except (LocationError, RecordStoreError) as exc:
            if attempt == 19:
                await store.close()
                raise StartupError(f"cannot reach Redis: {exc}") from None
            await asyncio.sleep(0.5)


async def open_store(config: Config) -> LocationStore:
    """Bindings in memory, or with ``--redis-url`` in Redis behind a view in memory that
    keeps calls working while Redis is away and writes back what Redis lost."""
    if not config.redis_url:
        return MemoryStore()
    try:
        redis = RedisStore(config.redis_url)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    await _reach_redis(redis)
    store = CachedStore(redis)
    try:
        await store.start()
    except LocationError as exc:
        await store.close()
        raise StartupError(f"cannot read the bindings: {exc}") from None
    return store


async def open_record_store(config: Config, trust: TrustStore) -> RecordStore:
    if not config.redis_url:
        return MemoryRecordStore(trust)
    try:
        store = RedisRecordStore(config.redis_url, trust)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    await _reach_redis(store)
    return store


async def open_dht(config: Config) -> tuple[DhtNode, SiteKey]:
    """This site's key, its trust list and a DHT node listening (not yet joined)."""
    try:
        key = SiteKey.load_or_create(config.data_dir)
        trust = TrustStore.from_dir(config.trust_dir, key)
    except KeyFileError as exc:
        raise StartupError(str(exc)) from None
    records = await open_record_store(config, trust)
    node = DhtNode(records, trust, key=key, rpc_timeout=config.dht_rpc_timeout)
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
    if config.trust_dir is not None:
        # Keys added, removed or replaced in the folder count within seconds, no restart.
        trust.start_watching()
        log.info("watching the trust folder %s (SIGHUP reloads it at once)", config.trust_dir)
    if not config.bootstrap:
        log.info("no --bootstrap: this node starts a new overlay")
    return node, key


def open_trust(config: Config) -> tuple[SiteKey, TrustStore]:
    """This site's key and trust list without a DHT node (workers 1..N-1: worker 0 runs
    the node), the trust folder watched as open_dht does."""
    try:
        key = SiteKey.load_or_create(config.data_dir)
        trust = TrustStore.from_dir(config.trust_dir, key)
    except KeyFileError as exc:
        raise StartupError(str(exc)) from None
    if config.trust_dir is not None:
        trust.start_watching()
    return key, trust


async def close_dht(node: DhtNode) -> None:
    await node.trust.stop_watching()
    await node.close()
    await node.store.close()


async def open_users(config: Config) -> UserStore:
    realm = config.domains[0] if config.domains else "p2psip"
    try:
        return await open_user_store(config, realm)
    except (UsersFileError, UserStoreError) as exc:
        raise StartupError(str(exc)) from None


def identity_for(config: Config, port: int, tls_port: int | None = None) -> ProxyIdentity:
    """How the proxy names itself (Via, Record-Route) and which addresses are its own."""
    listen = config.sip_listen.host
    host = config.advertise or listen
    if host in ("0.0.0.0", "::"):
        host = _primary_address()
    host = uri_host(host)  # [v6], as Via, Record-Route and URIs write it
    aliases = {(host.lower(), port)}
    if listen not in ("0.0.0.0", "::"):
        aliases.add((uri_host(listen).lower(), port))
    else:
        # Every address of this host reaches us: sip:alice@IP:port is for our users.
        aliases.update((uri_host(a), port) for a in local_addresses(ipv6=listen == "::"))
    if tls_port:
        aliases.add((host.lower(), tls_port))
        tls_host = tls_listen_of(config).host
        if tls_host not in ("0.0.0.0", "::"):
            aliases.add((uri_host(tls_host).lower(), tls_port))
    return ProxyIdentity(host, port, config.domains, frozenset(aliases), tls_port)


def locator_for(config: Config, transport: TransportLayer) -> DnsLocator:
    """RFC 3263 lookups through ``dns_server`` (or the system's), for the transports and
    address families this site can send on."""
    listen = config.sip_listen.host
    families = [socket.AF_INET6] if ":" in listen else [socket.AF_INET]
    if listen == "::":  # dual-stack
        families.append(socket.AF_INET)
    server = config.dns_server
    return DnsLocator(
        server=(server.host, server.port) if server is not None else None,
        transports=("udp", "tcp", "tls") if transport.tls is not None else ("udp", "tcp"),
        families=families,
    )


def uri_host(host: str) -> str:
    """A host as URIs write it: an IPv6 address in brackets, compressed."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def local_addresses(*, ipv6: bool) -> set[str]:
    """This host's own addresses (Linux: /proc), loopback included; link-local IPv6 ones
    left out (a URI cannot name their interface)."""
    found = {"127.0.0.1"}
    with contextlib.suppress(OSError):
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for above, line in itertools.pairwise(lines):
            if line.strip() == "/32 host LOCAL":
                found.add(above.split()[-1])
    if ipv6:
        found.add("::1")
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/if_inet6").read_text().splitlines():
                raw = line.split()[0]
                address = ipaddress.IPv6Address(bytes.fromhex(raw))
                if not address.is_link_local:
                    found.add(address.compressed)
    return found


def _primary_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def home_uri(me: ProxyIdentity, transport: str = "udp") -> str:
    """The SIP URI other sites reach this proxy at (the binding's home proxy), over
    ``transport`` (``--home-transport``; TLS is a ``sips:`` URI, RFC 5630)."""
    host = uri_host(me.host)
    if transport == "tls" and me.tls_port:
        return f"sips:{host}:{me.tls_port}"
    if transport == "tcp":
        return f"sip:{host}:{me.port};transport=tcp"
    return f"sip:{host}:{me.port}"


async def listen_tls(
    config: Config,
    transport: TransportLayer,
    key: SiteKey,
    trust: TrustStore,
    homes: Callable[[], list[tuple[str, str]]],
    sock: socket.socket | None = None,
) -> int:
    """Certificates (proxy.tls) and the TLS listener; returns its port. ``homes`` gives
    the member sites' (home proxy, key id) pairs, whose certificates are checked.
    ``sock``: the listener the supervisor bound for this worker (``--workers``)."""
    listen = tls_listen_of(config)
    host = config.advertise or config.sip_listen.host
    if host in ("0.0.0.0", "::"):
        host = _primary_address()  # as identity_for names us
    names = [host, *config.domains]
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            phones = check_pair(config.tls_cert, config.tls_key)
        else:
            phones = phone_certificate(config.data_dir, names)
        site = site_certificate(config.data_dir, key, config.site_id, names)
        verifier = PeerVerifier(trust, homes=homes, ca_file=config.tls_ca)
        tls = endpoint(phones, site, verifier)
    except TlsError as exc:
        raise StartupError(str(exc)) from None
    try:
        port = await transport.listen_tls(listen.host, listen.port, tls, sock)
    except OSError as exc:
        raise StartupError(f"cannot listen on {listen} (TLS): {exc.strerror or exc}") from None
    log.info("SIP over TLS listening on %s:%d (site key %s vouches for it to other sites)",
             listen.host, port, key.key_id)  # fmt: skip
    return port


# --- the site ---------------------------------------------------------------------------


@dataclass(eq=False)
class WorkerParts:
    """What one worker process of several (``--workers``) has beyond a site's parts."""

    plan: WorkerPlan
    siblings: Siblings
    handlers: Handlers
    directory: LocalDirectory
    publisher: ChangePublisher | None  # worker 0: publishes what the others changed


@dataclass(eq=False)
class Site:
    config: Config
    identity: ProxyIdentity
    counters: SipCounters
    store: LocationStore
    users: UserStore
    auth: AuthGate
    registrar: RegistrarService
    router: Router
    server: SipServer
    node: DhtNode | None  # None in workers 1..N-1: worker 0 runs the site's node
    key: SiteKey
    trust: TrustStore
    adaptor: DhtAdaptor | None  # None in workers 1..N-1 (proxy.worker_dht)
    dht: DhtRouter
    services: SiteServices | None  # the admin API's; worker 0 serves it
    sites: SiteDirectory
    prober: SiteProber
    nat_keepalive: NatKeepalive | None
    _jobs: Tasks = field(repr=False)
    _closing: contextlib.AsyncExitStack = field(repr=False)
    worker: WorkerParts | None = None

    @property
    def sip_port(self) -> int:
        return self.identity.port

    async def start(self) -> None:
        """Serve SIP and publish to the DHT (what run_site does before serving)."""
        worker = self.worker
        if worker is not None:
            await worker.siblings.start(worker.handlers)
        self.server.serve()
        if self.adaptor is not None:
            self.adaptor.start()
        if worker is not None and worker.publisher is not None:
            self._jobs.spawn(worker.publisher.run())
        self._jobs.spawn(self.prober.run())
        if self.nat_keepalive is not None:
            self._jobs.spawn(self.nat_keepalive.run())
        if self.adaptor is not None:
            with quiet():  # what the store holds, not registered through this worker
                await self.registrar.republish_all()
        else:
            self._jobs.spawn(self._learn_flows())

    async def _learn_flows(self) -> None:
        """Workers 1..N-1: learn the flow of every contact the store holds, for
        in-dialog requests to phones behind NAT (worker 0 republishes them instead)."""
        assert self.worker is not None
        now = time.time()
        directory = self.worker.directory
        try:
            async for aor in self.store.aors():
                for b in await self.store.load(aor, now):
                    if b.source:
                        directory.learn_flow(b.contact, b.source)
        except LocationError as exc:
            log.warning("cannot read the bindings' flows: %s", exc)

    def stats(self) -> dict[str, float]:
        """One flat snapshot of the site's counters (logged; served by the admin API)."""
        out: dict[str, float] = dict(self.counters.snapshot())
        if self.adaptor is not None:
            out.update(self.adaptor.stats.snapshot())
            out["dht_backlog"] = self.adaptor.backlog
        if self.node is not None:
            out.update({f"dht_node_{k}": v for k, v in self.node.stats().items()})
        if self.worker is not None:
            out["worker"] = self.worker.siblings.index
            out.update(self.worker.siblings.stats.snapshot())
            if self.worker.publisher is not None:
                out["workers_published"] = self.worker.publisher.published
                out["workers_publish_backlog"] = self.worker.publisher.backlog
        cache = self.dht.cache
        out["dht_cache_hits"] = cache.hits
        out["dht_cache_misses"] = cache.misses
        out["dht_cache_hit_rate"] = round(cache.hit_rate, 4)
        out["trusted_peer_requests"] = self.auth.peers.requests
        out.update(self.router.routing_stats())
        return out

    async def drain(self, grace: float) -> None:
        """Stop taking new requests and give those in flight up to ``grace`` seconds
        (ringing calls are cancelled; queued DHT writes get the time left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        cancelled = self.server.drain()
        busy = self._busy()
        log.info("draining: %d transaction(s) in flight, %d ringing call(s) cancelled",
                 busy, cancelled)  # fmt: skip
        while self._busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.adaptor is not None and self.adaptor.backlog:
            await self.adaptor.flush(max(0.0, deadline - loop.time()))
        left = self._busy()
        if left:
            log.warning("stopping with %d transaction(s) unfinished after %.1f s", left, grace)

    def _busy(self) -> int:
        """Transactions in flight, but for NAT keep-alives to dead phones (they would
        hold a shutdown for their Timer F)."""
        pings = self.nat_keepalive.inflight if self.nat_keepalive is not None else 0
        return self.server.transactions.busy() - pings

    async def close(self) -> None:
        await self._closing.aclose()


async def build_site(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    make_resolver: type[Resolver] = Resolver,
    dht_retry_delays: Sequence[float] = RETRY_DELAYS,
    worker: WorkerPlan | None = None,
) -> Site:
    """Open, bind and build everything a site runs, or raise StartupError (closing
    whatever was opened). ``make_resolver`` lets tests keep forwarded requests on this
    machine; ``dht_retry_delays`` lets them retry DHT writes sooner. ``worker``: this
    process is one of several workers of the site (proxy.workers, proxy.siblings)."""
    async with contextlib.AsyncExitStack() as stack:
        store = await open_store(config)
        stack.push_async_callback(store.close)
        users = await open_users(config)
        stack.push_async_callback(users.close)

        counters = SipCounters()
        peers = TrustedPeers(config.trusted_peers)
        siblings = Siblings(worker) if worker is not None else None
        # Told by the transport which flows end (RFC 5626 outbound: 430 for their phones).
        directory = LocalDirectory(
            store, users, clock, udp_flow_timeout=config.flow_timer + FLOW_GRACE,
            on_flow=siblings.flow_noted if siblings is not None else None,
        )  # fmt: skip
        flow_events = siblings.flow_events(directory) if siblings is not None else directory
        transport = TransportLayer(
            idle_timeout=config.tcp_idle_timeout, partial_timeout=config.tcp_partial_timeout,
            flood=FloodGuard(
                config.flood_max_requests, config.flood_window, config.flood_block_time,
                trusted=peers.__contains__,
            ),
            overload=OverloadControl(
                config.overload_queue_delay, config.max_transactions,
                lambda: len(transactions.server_txs),  # bound below, before any socket
            ),
            counters=counters, max_tcp_per_address=config.max_tcp_per_address,
            max_tcp_connections=config.max_tcp_connections, flow_events=flow_events,
            siblings=siblings,
        )  # fmt: skip
        # Before the sockets open: a datagram may come while the rest is being built
        # (the TLS certificates take a moment), and overload control counts these.
        timers = TimerConfig(t1=config.t1, t2=config.t2, t4=config.t4, timer_c=config.timer_c)
        transactions = TransactionLayer(transport, timers, counters)
        listen = config.sip_listen
        shared = (worker.sockets.udp, worker.sockets.tcp) if worker is not None else None
        try:
            port = await transport.start(listen.host, listen.port, shared=shared)
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        stack.push_async_callback(transport.close)
        log.info("SIP listening on %s:%d (UDP and TCP)", listen.host, port)
        if not config.domains:
            log.warning("no --domain given: serving every domain name")

        node: DhtNode | None = None
        if worker is None or worker.runs_dht:
            node, key = await open_dht(config)
            stack.push_async_callback(close_dht, node)
            trust = node.trust
        else:
            key, trust = open_trust(config)
            stack.push_async_callback(trust.stop_watching)
        sites: SiteDirectory  # below; the TLS check reads it when it connects

        def homes() -> list[tuple[str, str]]:
            return [(s.home, s.key_id) for s in sites.snapshot()]

        tls_sock = worker.sockets.tls if worker is not None else None
        tls_port = await listen_tls(config, transport, key, trust, homes, tls_sock)
        me = identity_for(config, port, tls_port)
        if worker is not None:
            me = worker_identity(me, worker.index)  # its Via names it
        home = home_uri(me, config.home_transport)
        adaptor: DhtAdaptor | None = None
        remote: RemoteAdaptor | None = None
        if node is not None:
            adaptor = DhtAdaptor(
                node, key, site_id=config.site_id, home=home, clock=clock,
                republish_interval=config.dht_republish, retry_delays=dht_retry_delays,
                lookup_timeout=config.dht_lookup_timeout,
            )  # fmt: skip
            stack.push_async_callback(adaptor.close)
        else:
            assert siblings is not None
            remote = RemoteAdaptor(
                siblings, key.key_id, site_id=config.site_id, home=home, clock=clock,
                lookup_timeout=config.dht_lookup_timeout,
            )  # fmt: skip
        publisher = adaptor if adaptor is not None else remote
        locator = adaptor if adaptor is not None else remote
        assert locator is not None

        tasks = Tasks("request task")
        secret = nonce_secret(config.data_dir)
        tokens = ProxyTokens(secret)
        auth = AuthGate(
            users, users.realm, secret,
            transactions=transactions, counters=counters, clock=clock,
            algorithms=config.digest_algorithms,
            lockout=AuthLockout(
                config.auth_max_failures, config.auth_failure_window,
                config.auth_block_time, config.auth_block_max,
            ),
            required=config.users_file is not None, peers=peers,
        )  # fmt: skip
        registrar = RegistrarService(
            RegistrarConfig(
                domains=config.domains, min_expires=config.min_expires,
                max_expires=config.max_expires, default_expires=config.default_expires,
                max_contacts=config.max_contacts, flow_timer_udp=config.flow_timer,
                # A CRLF keep-alive every 80-100% of it comes before the idle timeout.
                flow_timer_stream=max(1, int(config.tcp_idle_timeout * 0.9)),
            ),
            identity=me, directory=directory, transactions=transactions, auth=auth,
            publisher=publisher, counters=counters, clock=clock,
        )  # fmt: skip
        sites = SiteDirectory(home)
        dht = DhtRouter(locator, counters, cache_ttl=config.dht_cache_ttl, sites=sites)
        # A key removed from (or rescoped in) the trust folder stops routing calls at
        # once, not when the cached lookups run out.
        trust.on_change(
            lambda _change: dht.cache.retain(lambda aor, b: trust.allows(b.key_id, aor))
        )
        # Nor do TLS connections to its home proxies stay open (proxy.tls checked them).
        trust.on_change(lambda _change: transport.forget_tls_peers(trust.__contains__))
        resolver = make_resolver(
            transport.has_connection, locator=locator_for(config, transport),
            routes=[(r.domain, r.next_hop) for r in config.routes],
            outbound_proxy=config.outbound_proxy,
        )  # fmt: skip
        # RFC 3263 §4.3: the next target within the one Timer B/F.
        failover = Failover(
            transactions, tokens, silence=config.failover_timeout, budget=64 * timers.t1
        )
        router = Router(
            identity=me, transactions=transactions, directory=directory, auth=auth,
            resolver=resolver,
            forker=Forker(failover, me, tokens, timer_c=timers.timer_c),
            counters=counters, send=transport.send, spawn=tasks.spawn, tokens=tokens, dht=dht,
            relay_key=key, relays=RelayVerifier(trust), clock=clock,
            sites=sites, home_timeout=config.home_timeout, failover=failover,
            handover=siblings.take_response if siblings is not None else None,
        )  # fmt: skip
        server = SipServer(
            transport, transactions,
            registrar=registrar, router=router, counters=counters, tasks=tasks,
            limits=ParseLimits.from_values(config),
        )  # fmt: skip
        stack.push_async_callback(server.close)

        site: Site
        services = None
        if adaptor is not None and node is not None:
            services = SiteServices(
                sip_address=lambda: (transport.host, transport.port),
                store=store, registrar=registrar, users_store=users, adaptor=adaptor,
                node=node, snapshot=lambda: site.stats(),
                transactions=lambda: (len(transactions.server_txs), len(transactions.client_txs)),
                token=admin_token(config), clock=clock, require_peers=bool(config.bootstrap),
                auth_enabled=lambda: auth.enabled, member_sites=sites,
            )  # fmt: skip
        prober = SiteProber(
            sites, transactions, resolver, me,
            clock=clock, interval=config.site_probe_interval, timeout=config.home_timeout,
        )  # fmt: skip
        keepalive = None
        # With workers, worker 0 pings every phone (it notes what the others register).
        if config.nat_keepalive_interval and (worker is None or worker.runs_dht):
            keepalive = NatKeepalive(
                directory, transactions, registrar, me, counters,
                interval=config.nat_keepalive_interval, clock=clock,
            )  # fmt: skip
        jobs = Tasks("site job")
        stack.push_async_callback(jobs.close)
        parts = None
        if worker is not None and siblings is not None:
            parts = _worker_parts(
                worker, siblings, me, transport, directory, store, users, adaptor, jobs, clock
            )
            stack.push_async_callback(siblings.close)
        site = Site(
            config, me, counters, store, users, auth, registrar, router, server,
            node, key, trust, adaptor, dht, services, sites, prober, keepalive, jobs,
            stack.pop_all(), parts,
        )  # fmt: skip
        return site
    raise AssertionError("unreachable")  # the stack re-raises what failed


def _worker_parts(
    plan: WorkerPlan,
    siblings: Siblings,
    me: ProxyIdentity,
    transport: TransportLayer,
    directory: LocalDirectory,
    store: LocationStore,
    users: UserStore,
    adaptor: DhtAdaptor | None,
    jobs: Tasks,
    clock: Callable[[], float],
) -> WorkerParts:
    """How this worker serves its siblings' frames (proxy.siblings)."""
    handlers = Handlers(
        identity=me, holds=transport.holds, send_held=transport.send_held,
        deliver=transport.deliver, learn_flow=directory.learn_flow,
    )  # fmt: skip
    publisher = None
    if adaptor is not None:  # worker 0
        publisher = ChangePublisher(store, directory, adaptor, clock)
        handlers.changed = publisher.changed
        handlers.locate = functools.partial(serve_locate, adaptor)
        users.subscribe(siblings.users_changed)  # the admin API changed them here
    elif isinstance(users, RedisUserStore):
        redis_users = users

        async def reload() -> None:
            try:
                await redis_users.refresh()
            except UserStoreError as exc:
                log.warning("users: cannot reload after a change: %s", exc)

        def users_changed() -> None:
            jobs.spawn(reload())

        handlers.users_changed = users_changed
    return WorkerParts(plan, siblings, handlers, directory, publisher)

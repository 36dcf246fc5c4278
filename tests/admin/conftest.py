"""A real site in the test's event loop (SIP server on port 0, location store, users, a
DHT node joined to a second node, the adaptor), wired as ``proxy.app.run_site`` wires
it, with the admin app in front of it and an httpx client talking to the app."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from admin_api.app import create_app
from admin_api.site_services import SiteServices
from dht_adaptor.adaptor import DhtAdaptor
from dht_adaptor.keys import SiteKey, TrustStore
from dht_adaptor.location import LocationStore, MemoryStore
from dht_adaptor.node import DhtNode
from dht_adaptor.record_store import MemoryRecordStore
from proxy.app import build_auth, home_uri, open_dht, site_stats
from proxy.config import Config, HostPort
from proxy.dht_routing import DhtRouter
from proxy.server import SipServer
from proxy.user_store import UserStore

from .sip_ua import DOMAIN, HOST, UdpUa

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class LiveSite:
    config: Config
    server: SipServer
    sip_port: int
    users: UserStore
    node: DhtNode
    adaptor: DhtAdaptor
    services: SiteServices
    app: FastAPI
    client: httpx.AsyncClient
    peer: DhtNode | None = None
    uas: list[UdpUa] = field(default_factory=list)

    async def ua(self) -> UdpUa:
        ua = await UdpUa.open(self.sip_port)
        self.uas.append(ua)
        return ua


@contextlib.asynccontextmanager
async def live_site(
    tmp_path: Path,
    *,
    redis_url: str | None = None,
    users_file: Path | None = None,
    with_peer: bool = True,
    require_peers: bool = True,
    peer_trusts: tuple[SiteKey, ...] = (),
) -> AsyncIterator[LiveSite]:
    config = Config(
        domains=(DOMAIN,),
        sip_listen=HostPort(HOST, 0),
        dht_listen=HostPort(HOST, 0),
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        users_file=users_file,
        dht_rpc_timeout=1.0,  # generous: a busy CI machine must not time out on loopback
        dht_lookup_timeout=2.0,
    )
    store: LocationStore
    redis_ping = None
    if redis_url:
        from dht_adaptor.redis_store import RedisStore

        redis_store = RedisStore(redis_url)
        store, redis_ping = redis_store, redis_store.ping
    else:
        store = MemoryStore()
    server = SipServer(config, store)
    users = await build_auth(config, server)
    sip_port = await server.start()
    node, key = await open_dht(config)
    peer = None
    if with_peer:
        # A second node that trusts this site (and maybe others): the site's one peer.
        trust = TrustStore({k.key_id: k.public_bytes for k in (key, *peer_trusts)})
        peer = DhtNode(MemoryRecordStore(trust), trust, rpc_timeout=1.0)
        peer_port = await peer.listen(HOST, 0)
        assert await node.bootstrap([(HOST, peer_port)]) == 1
    adaptor = DhtAdaptor(node, key, site_id="paris", home=home_uri(server), retry_delays=(0.1,))
    server.registrar.attach_dht(adaptor)
    server.proxy.dht = DhtRouter(server.proxy, adaptor, adaptor.home, lookup_timeout=2.0)
    adaptor.start()
    services = SiteServices(
        server, users, adaptor, node, functools.partial(site_stats, server, adaptor, node),
        TOKEN, require_peers=require_peers, redis_ping=redis_ping, lookup_timeout=2.0,
    )  # fmt: skip
    app = create_app(services)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin", headers=AUTH
    )
    site = LiveSite(config, server, sip_port, users, node, adaptor, services, app, client, peer)
    try:
        yield site
    finally:
        await client.aclose()
        for ua in site.uas:
            ua.close()
        await server.close()
        await adaptor.close()
        await node.close()
        if peer is not None:
            await peer.close()
        await users.close()
        await store.close()


SiteFactory = Callable[..., AbstractAsyncContextManager[LiveSite]]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[LiveSite]:
    """A site with in-memory bindings, users in DATA_DIR/users.toml, one DHT peer."""
    async with live_site(tmp_path) as s:
        yield s


@pytest.fixture
def make_site(tmp_path: Path) -> Callable[..., Any]:
    """``async with make_site(redis_url=..., ...) as site`` for the other variants."""
    return functools.partial(live_site, tmp_path)

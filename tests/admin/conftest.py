"""A real site in the test's event loop (SIP server on port 0, location store, users, a
DHT node joined to a second node, the adaptor), built by ``proxy.site.build_site`` as
``p2psip run`` builds it, with the admin app in front of it and an httpx client talking
to the app."""

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
from dht_adaptor.adaptor import DhtAdaptor
from dht_adaptor.keys import SiteKey, TrustStore
from dht_adaptor.node import DhtNode
from dht_adaptor.record_store import MemoryRecordStore
from proxy.admin_services import SiteServices
from proxy.auth_gate import AuthGate
from proxy.config import Config, HostPort
from proxy.site import Site, build_site
from proxy.stats import SipCounters
from proxy.user_store import UserStore

from .sip_ua import DOMAIN, HOST, UdpUa

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class LiveSite:
    site: Site
    client: httpx.AsyncClient
    app: FastAPI
    peer: DhtNode | None = None
    uas: list[UdpUa] = field(default_factory=list)

    @property
    def config(self) -> Config:
        return self.site.config

    @property
    def sip_port(self) -> int:
        return self.site.sip_port

    @property
    def users(self) -> UserStore:
        return self.site.users

    @property
    def auth(self) -> AuthGate:
        return self.site.auth

    @property
    def counters(self) -> SipCounters:
        return self.site.counters

    @property
    def node(self) -> DhtNode:
        return self.site.node

    @property
    def adaptor(self) -> DhtAdaptor:
        return self.site.adaptor

    @property
    def services(self) -> SiteServices:
        return self.site.services

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
    """A site built by ``proxy.site.build_site``, as ``p2psip run`` builds it, whose DHT
    node is joined to one peer node (or, without ``with_peer``, to none: a bootstrap
    address nobody answers at, or no bootstrap at all without ``require_peers``)."""
    peer = None
    bootstrap: tuple[HostPort, ...] = ()
    if with_peer:
        # A second node that trusts this site (and maybe others): the site's one peer.
        key = SiteKey.load_or_create(tmp_path / "data")
        trust = TrustStore({k.key_id: k.public_bytes for k in (key, *peer_trusts)})
        peer = DhtNode(MemoryRecordStore(trust), trust, key=key, rpc_timeout=1.0)
        bootstrap = (HostPort(HOST, await peer.listen(HOST, 0)),)
    elif require_peers:
        bootstrap = (HostPort(HOST, 9),)  # discard: never asked, the site stays alone
    config = Config(
        domains=(DOMAIN,),
        sip_listen=HostPort(HOST, 0),
        dht_listen=HostPort(HOST, 0),
        bootstrap=bootstrap,
        data_dir=tmp_path / "data",
        redis_url=redis_url,
        users_file=users_file,
        site_id="paris",
        admin_token=TOKEN,
        dht_rpc_timeout=1.0,  # generous: a busy CI machine must not time out on loopback
        dht_lookup_timeout=2.0,
    )
    site = await build_site(config, dht_retry_delays=(0.1,))
    if peer is not None:
        assert await site.node.bootstrap([(HOST, bootstrap[0].port)]) == 1
    await site.start()
    app = create_app(site.services)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin", headers=AUTH
    )
    live = LiveSite(site, client, app, peer)
    try:
        yield live
    finally:
        await client.aclose()
        for ua in live.uas:
            ua.close()
        await site.close()
        if peer is not None:
            await peer.close()


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

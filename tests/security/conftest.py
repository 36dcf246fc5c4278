"""A site on 127.0.0.1 with users (digest auth on), built as ``p2psip run`` builds it, and
endpoints on other loopback addresses: attackers and the "outside" hosts they aim at."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, HostPort
from proxy.site import Site, build_site

from .ua import Endpoint, Sip

DOMAIN = "example.com"
USERS = '[users."alice"]\npassword = "wonderland"\n[users."bob"]\npassword = "builder"\n'


async def start_site(tmp_path: Path, *, users: bool = True, **settings: Any) -> Site:
    users_file = None
    if users:
        users_file = tmp_path / "users.toml"
        users_file.write_text(USERS)
    config = Config(
        domains=(DOMAIN,),
        sip_listen=HostPort("127.0.0.1", 0),
        dht_listen=HostPort("127.0.0.1", 0),
        data_dir=tmp_path / "data",
        users_file=users_file,
        admin_token="t",
        **settings,
    )
    site = await build_site(config)
    await site.start()
    return site


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    s = await start_site(tmp_path)
    yield s
    await s.close()


@pytest.fixture
async def endpoints() -> AsyncIterator[Callable[..., Any]]:
    opened: list[Endpoint] = []

    async def make(host: str = "127.0.0.1", **kw: Any) -> Endpoint:
        ep = await Endpoint.open(host, **kw)
        opened.append(ep)
        return ep

    yield make
    for ep in opened:
        ep.close()


def sip(ep: Endpoint, site: Site) -> Sip:
    return Sip(ep, ("127.0.0.1", site.sip_port))

"""TLS between sites: with ``home_transport = "tls"`` a site's bindings name a ``sips:``
home proxy, and calls relayed to it go over TLS, its certificate checked against the
trust folder (issued by the site key that signs the bindings naming that home). A server
at that address that shows anything else (another member's certificate, one issued by a
key nobody trusts) is refused before a byte of SIP reaches it, and the log says why.

Sites run in this process (``build_site``) on 127.0.0.2 (paris) and 127.0.0.3 (berlin);
phones are pjsua2 phones (the call) and raw UDP endpoints (the attack).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dht_adaptor.keys import SiteKey
from proxy import tls
from proxy.config import Config, HostPort
from proxy.site import Site, build_site
from tests.security.ua import Endpoint, Sip
from tests.test_tls import Rogue

pytestmark = pytest.mark.e2e

DOMAIN = "example.com"
PARIS, BERLIN = "127.0.0.2", "127.0.0.3"


class Federation:
    """Sites sharing one trust folder: paris, berlin, and rome (trusted, never started)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.trust = tmp_path / "trust"
        self.trust.mkdir()
        self.keys = {}
        for name in ("paris", "berlin", "rome"):
            self.keys[name] = SiteKey.load_or_create(tmp_path / name)
            (self.trust / f"{name}.pub").write_bytes((tmp_path / name / "site.pub").read_bytes())
        self.sites: list[Site] = []

    async def start(self, name: str, host: str, bootstrap: tuple[HostPort, ...] = ()) -> Site:
        site = await build_site(
            Config(
                domains=(DOMAIN,), sip_listen=HostPort(host, 0), dht_listen=HostPort(host, 0),
                data_dir=self.tmp / name, trust_dir=self.trust, bootstrap=bootstrap,
                site_id=name, admin_token="t", site_probe_interval=0.3, home_timeout=0.5,
                home_transport="tls",
            )
        )  # fmt: skip
        self.sites.append(site)
        await site.start()
        return site

    async def pair(self) -> tuple[Site, Site]:
        berlin = await self.start("berlin", BERLIN)
        dht = HostPort(BERLIN, berlin.node.address[1])
        paris = await self.start("paris", PARIS, (dht,))
        assert await paris.node.bootstrap([(dht.host, dht.port)]) >= 1
        return paris, berlin

    async def close(self) -> None:
        for site in reversed(self.sites):
            await site.close()


@pytest.fixture
async def federation(tmp_path: Path) -> AsyncIterator[Federation]:
    f = Federation(tmp_path)
    yield f
    await f.close()


def tls_home(site: Site) -> str:
    return f"sips:{site.identity.host}:{site.identity.tls_port}"


async def test_two_sites_relay_a_call_over_tls(federation: Federation, phone_factory: Any) -> None:
    paris, berlin = await federation.pair()
    run = asyncio.to_thread
    alice = await run(phone_factory, "alice", bind_ip=PARIS)
    bob = await run(phone_factory, "bob", transport="tls", bind_ip=BERLIN)
    assert await run(alice.register, f"{PARIS}:{paris.sip_port}", "alice", DOMAIN) == 200
    berlin_tls = f"{BERLIN}:{berlin.identity.tls_port}"
    assert await run(bob.register, berlin_tls, "bob", DOMAIN) == 200
    assert await berlin.adaptor.flush()

    await run(alice.call, f"sip:bob@{DOMAIN}")
    incoming = await run(bob.wait_incoming, 15)
    invite = incoming["msg"]
    # paris relayed to berlin's sips: home over TLS; berlin to bob over his TLS flow.
    assert f"Via: SIP/2.0/TLS {PARIS}:{paris.identity.tls_port};" in invite
    assert f"Via: SIP/2.0/TLS {BERLIN}:{berlin.identity.tls_port};" in invite
    assert f"<sip:{PARIS}:{paris.identity.tls_port};transport=tls;lr;" in invite
    conn = paris.server.transport.connections[(BERLIN, berlin.identity.tls_port)]
    assert conn.kind == "tls"
    assert str(getattr(conn, "peer", "")) == f"site key {federation.keys['berlin'].key_id}"
    await run(bob.answer, 200)
    await run(alice.wait_state, "CONFIRMED", 15)
    await run(bob.wait_state, "CONFIRMED", 15)
    # bob hangs up: berlin opens a TLS connection back to paris's Record-Route and checks
    # paris's certificate (issued by a trusted key) before the BYE goes.
    await run(bob.hangup)
    await run(alice.wait_state, "DISCONNECTED", 15)
    await run(bob.wait_state, "DISCONNECTED", 15)
    (seen,) = paris.services.sites()
    assert seen.home == tls_home(berlin)
    # berlin's key leaves paris's trust: the TLS connection to berlin is closed at once.
    (federation.trust / "berlin.pub").unlink()
    paris.node.trust.reload("test")
    await asyncio.sleep(0.1)
    assert not paris.server.transport.has_connection(BERLIN, berlin.identity.tls_port or 0)


async def rogue_certificate(directory: Path, key: SiteKey | None) -> tuple[Path, Path]:
    """A certificate issued by ``key`` (None: a key nobody trusts), as a site makes one."""
    pair = tls.site_certificate(directory, key or SiteKey.generate(), "rogue", [BERLIN])
    return pair.cert, pair.key


@pytest.mark.parametrize("issuer", ["rome", "stranger"])
async def test_a_server_with_another_certificate_at_a_sites_home_gets_nothing(
    federation: Federation, issuer: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    paris, berlin = await federation.pair()
    berlin_key = federation.keys["berlin"].key_id
    bob = await Endpoint.open(BERLIN)  # answers INVITEs 486
    caller = await Endpoint.open(PARIS)
    try:
        ok = await Sip(bob, (BERLIN, berlin.sip_port)).request(
            "REGISTER", f"sip:{DOMAIN}", from_=f"sip:bob@{DOMAIN}", to=f"sip:bob@{DOMAIN}"
        )
        assert ok.status == 200
        assert await berlin.adaptor.flush()
        call = Sip(caller, (PARIS, paris.sip_port))
        resp = await call.request("INVITE", f"sip:bob@{DOMAIN}", from_="sip:x@outside.test")
        assert resp.status == 486  # through both sites, over TLS between them
        bob.received.clear()

        # berlin goes away; at its home address a server shows another certificate:
        # rome's (a member, but not the site whose bindings name this home), or one
        # issued by a key no site trusts.
        port = berlin.identity.tls_port
        assert port is not None
        await berlin.close()
        federation.sites.remove(berlin)
        key = federation.keys["rome"] if issuer == "rome" else None
        cert, private = await rogue_certificate(federation.tmp / "rogue", key)
        rogue = await Rogue.start(cert, private, BERLIN, port)
        try:
            resp = await call.request("INVITE", f"sip:bob@{DOMAIN}", from_="sip:x@outside.test")
            assert resp.status in (480, 503), resp
            await asyncio.sleep(0.5)  # the prober tries too
            assert rogue.received == b""  # not one byte of SIP
        finally:
            await rogue.close()
        assert bob.received == []
        if issuer == "rome":
            why = (
                f"certificate of site key {federation.keys['rome'].key_id}, but the home "
                f"proxy at this address is the site of key {berlin_key}"
            )
        else:
            why = f"not a certificate of site key {berlin_key}, whose home proxy this is"
        assert "refused TLS peers" in caplog.text and why in caplog.text, caplog.text
    finally:
        bob.close()
        caller.close()

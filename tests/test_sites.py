"""Sites you can see: a site learns the member sites from the overlay, asks their home
proxies for an answer every few seconds, and tells the admin (``/sites``, Prometheus, the
log) which answer, when, and how fast."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from admin_api.app import create_app
from dht_adaptor.keys import SiteKey
from proxy.config import Config, HostPort
from proxy.site import Site, build_site
from tests.security.ua import Endpoint, Sip

DOMAIN = "example.com"


async def start(tmp_path: Path, name: str, host: str, bootstrap: tuple[HostPort, ...]) -> Site:
    site = await build_site(
        Config(
            domains=(DOMAIN,), sip_listen=HostPort(host, 0), dht_listen=HostPort(host, 0),
            data_dir=tmp_path / name, trust_dir=tmp_path / "trust", bootstrap=bootstrap,
            site_id=name, admin_token="t", site_probe_interval=0.3, home_timeout=0.5,
        )
    )  # fmt: skip
    await site.start()
    return site


async def wait_until(check: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_site_sees_the_other_sites_and_whether_they_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    trust = tmp_path / "trust"
    trust.mkdir()
    for name in ("paris", "berlin"):
        key = SiteKey.load_or_create(tmp_path / name)
        (trust / f"{name}.pub").write_bytes((tmp_path / name / "site.pub").read_bytes())
        assert key.key_id
    berlin = await start(tmp_path, "berlin", "127.0.0.3", ())
    paris = await start(
        tmp_path, "paris", "127.0.0.2", (HostPort("127.0.0.3", berlin.node.address[1]),)
    )
    phone = caller = None
    try:
        assert await paris.node.bootstrap([("127.0.0.3", berlin.node.address[1])]) >= 1
        # bob registers at berlin; a call from paris looks him up and learns berlin.
        phone = await Endpoint.open("127.0.0.3")
        bob = Sip(phone, ("127.0.0.3", berlin.sip_port))
        ok = await bob.request("REGISTER", f"sip:{DOMAIN}", from_=f"sip:bob@{DOMAIN}",
                               to=f"sip:bob@{DOMAIN}")  # fmt: skip
        assert ok.status == 200
        assert await berlin.adaptor.flush()
        caller = await Endpoint.open("127.0.0.2")
        call = Sip(caller, ("127.0.0.2", paris.sip_port))
        resp = await call.request("INVITE", f"sip:bob@{DOMAIN}", from_="sip:x@outside.test")
        assert resp.status == 486  # bob's phone answered through both sites

        await wait_until(lambda: [s.reachable for s in paris.services.sites()] == [True])
        (seen,) = paris.services.sites()
        assert (seen.site_id, seen.home) == ("berlin", f"sip:127.0.0.3:{berlin.sip_port}")
        assert seen.bindings_seen == 1 and seen.rtt is not None and seen.last_heard

        app = create_app(paris.services)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://admin",
            headers={"Authorization": "Bearer t"},
        ) as admin:  # fmt: skip
            listed = (await admin.get("/sites")).json()["sites"]
            assert [(s["site_id"], s["reachable"]) for s in listed] == [("berlin", True)]
            metrics = (await admin.get("/metrics")).text
            assert 'p2psip_site_reachable{site="berlin"} 1.0' in metrics

            # berlin's proxy goes away: its probes go unanswered.
            await berlin.server.close()
            await wait_until(lambda: [s.reachable for s in paris.services.sites()] == [False])
            listed = (await admin.get("/sites")).json()["sites"]
            assert listed[0]["reachable"] is False
            assert "site berlin at " in caplog.text and "is unreachable" in caplog.text
            assert 'p2psip_site_reachable{site="berlin"} 0.0' in (await admin.get("/metrics")).text
    finally:
        for ep in (phone, caller):
            if ep is not None:
                ep.close()
        await paris.close()
        await berlin.close()

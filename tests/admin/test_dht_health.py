"""GET /dht, GET /dht/lookup/{aor} (signature-checked, timed), /health and /ready."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx

from dht_adaptor.errors import DhtRejected
from dht_adaptor.keys import SiteKey, sign_binding
from dht_adaptor.record import DhtBinding

from .conftest import LiveSite

ALICE = "sip:alice@example.com"
MakeSite = Callable[..., AbstractAsyncContextManager[LiveSite]]


async def test_dht_shows_the_node_its_peer_and_its_records(site: LiveSite) -> None:
    assert site.peer is not None
    ua = await site.ua()
    assert await ua.register("alice") == 200
    assert await site.adaptor.flush()
    body = (await site.client.get("/dht")).json()
    assert body["node_id"] == site.node.node_id_hex and len(body["node_id"]) == 40
    assert (body["host"], body["port"]) == site.node.address
    assert body["site_id"] == "paris"
    assert body["key_id"] == site.adaptor.key.key_id
    assert body["peer_count"] == 1
    assert body["peers"] == [
        {"node_id": site.peer.node_id_hex, "host": "127.0.0.1", "port": site.peer.address[1]}
    ]
    assert body["stored_records"] == 1  # two nodes: both are among the closest


async def test_lookup_returns_only_verified_bindings(make_site: MakeSite) -> None:
    rogue = SiteKey.generate()  # a key the peer trusts and this site does not
    async with make_site(peer_trusts=(rogue,)) as site:
        assert site.peer is not None
        ua = await site.ua()
        assert await ua.register("alice") == 200
        assert await site.adaptor.flush()
        forged = sign_binding(
            DhtBinding(
                aor=ALICE, contact="sip:alice@203.0.113.9", home="sip:203.0.113.9:5060",
                expires_at=site.adaptor.clock() + 300, site="rogue", version=1,
            ),
            rogue,
        )  # fmt: skip
        with contextlib.suppress(DhtRejected):  # this site's node refuses it: 1 of 2
            await site.peer.put(ALICE, [forged])
        r = await site.client.get(f"/dht/lookup/{ALICE}")
        assert r.status_code == 200
        body = r.json()
        assert body["aor"] == ALICE
        assert [b["contact"] for b in body["bindings"]] == [ua.contact]
        assert body["bindings"][0]["site"] == "paris"
        assert body["rejected"] >= 1  # the forged binding, refused by signature
        assert 0 < body["latency_ms"] < 2000


async def test_lookup_when_no_node_answers_is_503_json(site: LiveSite) -> None:
    # (With the peer gone the site's own node would still answer "none", rightly: in a
    # two-node overlay every acknowledged write is on both. So both go.)
    assert site.peer is not None
    await site.peer.close()
    await site.node.close()
    r = await site.client.get("/dht/lookup/sip:nobody@example.com")
    assert r.status_code == 503
    assert "DHT lookup" in r.json()["message"]


async def test_health_and_ready_need_no_token(site: LiveSite) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=site.app), base_url="http://admin"
    ) as anonymous:
        assert (await anonymous.get("/health")).json() == {"status": "ok"}
        r = await anonymous.get("/ready")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True and body["message"] == "ready"
    assert {c["name"]: c["ok"] for c in body["checks"]} == {"sip": True, "dht": True, "users": True}


async def test_not_ready_without_a_dht_peer(make_site: MakeSite) -> None:
    async with make_site(with_peer=False) as site:
        r = await site.client.get("/ready")
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False
        assert body["message"].startswith("dht: no DHT peer")
    # A site that starts the overlay (no --bootstrap) is the whole DHT by itself.
    async with make_site(with_peer=False, require_peers=False) as site:
        assert (await site.client.get("/ready")).status_code == 200


async def test_ready_with_redis(make_site: MakeSite, redis_server: object) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    async with make_site(redis_url=url) as site:
        body = (await site.client.get("/ready")).json()
        assert {c["name"]: c["ok"] for c in body["checks"]} == {
            "sip": True, "dht": True, "redis": True, "users": True,
        }  # fmt: skip

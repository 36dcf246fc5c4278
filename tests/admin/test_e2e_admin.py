"""The admin API of a real ``p2psip run`` process, with pjsua2 phones and SIPp.

A phone registers, the API lists it, DELETE removes it, and a SIPp call to it then fails
with 480. Users created through the API register with digest auth at once; wrong
passwords are refused. Nothing but /health and /ready answers without the token.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.support.phone import Phone
from tests.support.sipp import DEFAULT_DOMAIN, Sipp
from tests.support.site import Site

pytestmark = pytest.mark.e2e

DOMAIN = DEFAULT_DOMAIN  # what the SIPp scenarios call
TOKEN = "e2e-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

SiteFactory = Callable[..., Site]
PhoneFactory = Callable[..., Phone]


def admin(site: Site) -> httpx.Client:
    return httpx.Client(base_url=f"http://{site.admin}", headers=AUTH, timeout=10)


def test_list_delete_and_the_phone_is_unreachable(
    site_factory: SiteFactory, phone_factory: PhoneFactory, sipp: Sipp
) -> None:
    site = site_factory("--domain", DOMAIN, "--admin-token", TOKEN)
    alice = phone_factory("alice")
    assert alice.register(site.sip, "alice", DOMAIN) == 200
    aor = f"sip:alice@{DOMAIN}"
    with admin(site) as api:
        listed = api.get("/registrations").json()["items"]
        assert [item["aor"] for item in listed] == [aor]
        (binding,) = listed[0]["bindings"]
        assert f":{alice.port}" in binding["contact"]

        detail = api.get(f"/registrations/{aor}", params={"dht": "true"}).json()
        assert detail["dht"]["error"] is None  # the lone site is the whole overlay

        removed = api.delete(f"/registrations/{aor}")
        assert removed.status_code == 200 and removed.json() == {"aor": aor, "removed": 1}
        assert api.get(f"/registrations/{aor}").status_code == 404

    result = sipp.call_expecting_failure((site.host, site.port), "alice", 480, calls=2)
    assert result.ok, result.report()
    assert (result.successful, result.failed) == (2, 0), result.report()


def test_users_created_through_the_api_register_at_once(
    site_factory: SiteFactory, phone_factory: PhoneFactory
) -> None:
    site = site_factory("--domain", DOMAIN, "--admin-token", TOKEN)
    with admin(site) as api:
        r = api.post("/users", json={"username": "alice", "password": "wonderland"})
        assert r.status_code == 201 and "wonderland" not in r.text
        alice = phone_factory("alice")
        assert alice.register(site.sip, "alice", DOMAIN, password="wonderland") == 200
        mallory = phone_factory("mallory")
        assert mallory.register(site.sip, "alice", DOMAIN, password="guess") in (401, 403)
        stranger = phone_factory("stranger")
        assert stranger.register(site.sip, "stranger", DOMAIN) == 401

        assert api.put("/users/alice", json={"password": "looking-glass"}).status_code == 200
        stale = phone_factory("stale")
        assert stale.register(site.sip, "alice", DOMAIN, password="wonderland") in (401, 403)
        fresh = phone_factory("fresh")
        assert fresh.register(site.sip, "alice", DOMAIN, password="looking-glass") == 200
        assert api.get("/users").json()["users"][0]["username"] == "alice"


def test_token_metrics_and_a_clean_stop(site_factory: SiteFactory, sipp: Sipp) -> None:
    site = site_factory("--domain", DOMAIN, "--admin-token", TOKEN)
    sipp_result = sipp.register((site.host, site.port), [("bob",), ("carol",)])
    assert sipp_result.ok, sipp_result.report()
    base = f"http://{site.admin}"
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base}/ready").status_code == 200  # no --bootstrap: a lone overlay
    for path in ("/registrations", "/users", "/dht", "/stats", "/metrics", "/openapi.json"):
        r = httpx.get(f"{base}{path}")
        assert r.status_code == 401, path
        assert r.json()["message"]
    with admin(site) as api:
        metrics = api.get("/metrics").text
        assert 'p2psip_sip_requests_received_total{method="REGISTER"} 2.0' in metrics
        assert "p2psip_registered_aors 2.0" in metrics
        assert api.get("/stats").json()["registrar"]["aors"] == 2
        assert api.get("/openapi.json").json()["info"]["title"] == "p2psip admin API"
    assert site.stop() == 0
    assert TOKEN not in site.log()

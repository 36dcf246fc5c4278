"""GET /stats and GET /metrics: the site's counters, and DHT latency histograms."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from admin_api.app import create_app

from .conftest import AUTH, LiveSite
from .sip_ua import BUSY


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _traffic(site: LiveSite) -> None:
    phone, caller = await site.ua(), await site.ua()
    assert await phone.register("alice") == 200
    assert await caller.invite("alice") == BUSY  # routed to a local binding
    assert await caller.invite("nobody") == 404  # not here, not in the DHT
    assert await site.adaptor.flush()


async def test_stats_json(site: LiveSite) -> None:
    await _traffic(site)
    r = await site.client.get("/stats")
    assert r.status_code == 200
    s = r.json()
    assert s["sip"]["requests"]["REGISTER"] == 1
    assert s["sip"]["requests"]["INVITE"] == 2
    assert s["sip"]["responses_sent"]["2xx"] >= 1
    assert s["sip"]["responses_sent"]["4xx"] >= 1
    assert s["sip"]["responses_received"]["4xx"] == 1  # the phone's 486
    assert s["registrar"] == {
        "aors": 1, "bindings": 1, "registers_ok": 1, "auth_failures": 0, "users": 0,
    }  # fmt: skip
    assert s["calls"]["routed_local"] == 1 and s["calls"]["routed_dht"] == 0
    assert s["dht"]["puts_ok"] >= 1
    assert s["dht"]["lookups"] == 1  # for "nobody"
    assert s["dht"]["gets_ok"] == 1
    assert s["dht"]["peers"] == 1
    assert s["counters"]["registers_ok"] == 1


async def test_metrics_prometheus_text(site: LiveSite) -> None:
    await _traffic(site)
    r = await site.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(r.text)
    assert got[("p2psip_sip_requests_received_total", (("method", "REGISTER"),))] == 1
    assert got[("p2psip_sip_responses_sent_total", (("class", "4xx"),))] >= 1
    assert got[("p2psip_calls_routed_total", (("via", "local"),))] == 1
    assert got[("p2psip_calls_routed_total", (("via", "dht"),))] == 0
    assert got[("p2psip_registered_bindings", ())] == 1
    assert got[("p2psip_dht_puts_total", (("outcome", "ok"),))] >= 1
    assert ("p2psip_dht_lookup_cache_total", (("result", "hit"),)) in got
    assert ("p2psip_dht_records_rejected_total", (("where", "lookup"),)) in got
    assert ("p2psip_sip_transactions_active", (("kind", "server"),)) in got
    # Latency histograms, fed as the puts and gets happened.
    put_count = got[("p2psip_dht_operation_seconds_count", (("op", "put"), ("outcome", "ok")))]
    assert put_count >= 1
    assert got[("p2psip_dht_operation_seconds_count", (("op", "get"), ("outcome", "ok")))] == 1
    inf = (("le", "+Inf"), ("op", "put"), ("outcome", "ok"))
    assert got[("p2psip_dht_operation_seconds_bucket", inf)] == put_count


async def test_made_up_methods_share_one_label(site: LiveSite) -> None:
    for n in range(3):
        site.counters.request(f"X-NONSENSE-{n}")
    got = samples((await site.client.get("/metrics")).text)
    assert got[("p2psip_sip_requests_received_total", (("method", "other"),))] == 3


async def test_each_app_has_its_own_registry(site: LiveSite) -> None:
    # No global registry: a second app on the same site neither clashes nor double-counts.
    import httpx

    other = create_app(site.services)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=other), base_url="http://admin", headers=AUTH
    ) as client:
        r = await client.get("/metrics")
    assert r.status_code == 200 and "p2psip_sip_requests_received_total" in r.text


async def test_the_edge_defences_are_exported(site: LiveSite) -> None:
    # A failed login's block and a refused relay show up as Prometheus counters.
    site.counters.auth_blocks += 2
    site.counters.relay_denied += 3
    site.counters.overloaded = 1
    got = samples((await site.client.get("/metrics")).text)
    assert got[("p2psip_auth_blocks_total", ())] == 2
    assert got[("p2psip_relay_denied_total", ())] == 3
    assert got[("p2psip_overloaded", ())] == 1
    assert ("p2psip_flood_dropped_total", ()) in got
    assert ("p2psip_queue_delay_seconds", ()) in got
    assert got[("p2psip_dht_datagrams_refused_total", (("reason", "untrusted_key"),))] == 0

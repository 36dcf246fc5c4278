"""DhtRouter: which home proxies a request for a user of another site goes to, with a fake
locator (canned DHT answers) and a manual clock."""

from __future__ import annotations

import pytest

from proxy.dht_routing import DhtRouter, is_relayed
from proxy.location import LocationUnavailable
from proxy.sip.uri import SipUri, parse_uri
from proxy.stats import SipCounters

from .fakes import HOME, FakeLocator, HomeRecord, ManualClock

BOB = "sip:bob@example.com"
SITE_B = "sip:198.51.100.7:5060"
SITE_C = "sip:198.51.100.8:5070;transport=tcp"


def sip_uri(text: str) -> SipUri:
    uri = parse_uri(text)
    assert isinstance(uri, SipUri)
    return uri


RURI = sip_uri(BOB)


def dht_router(ttl: float = 10.0) -> tuple[DhtRouter, FakeLocator, SipCounters, ManualClock]:
    clock = ManualClock()
    locator = FakeLocator(clock)
    counters = SipCounters()
    return DhtRouter(locator, counters, cache_ttl=ttl), locator, counters, clock


async def test_one_target_per_home_best_q_first() -> None:
    router, locator, _, _ = dht_router()
    locator.bindings[BOB] = [
        HomeRecord(SITE_B, q=0.3),
        HomeRecord(SITE_C, q=0.5),
        HomeRecord(SITE_B, q=0.9),  # the home's best binding decides its place
    ]
    found = await router.route(BOB, RURI)
    assert [str(h) for h in found.homes] == [SITE_B, SITE_C]
    assert found.known
    assert found.aor == BOB
    assert found.request_uri == RURI
    assert found.ruri == "sip:bob@example.com;p2psip=home"
    assert is_relayed(sip_uri(found.ruri))
    assert not found.from_cache


async def test_our_own_home_is_dropped() -> None:
    router, locator, _, _ = dht_router()
    locator.bindings[BOB] = [HomeRecord(HOME, q=1.0), HomeRecord(SITE_B, q=0.1)]
    found = await router.route(BOB, RURI)
    assert [str(h) for h in found.homes] == [SITE_B]


async def test_a_user_no_site_holds_has_no_homes_and_is_unknown() -> None:
    router, _, _, _ = dht_router()
    found = await router.route(BOB, RURI)
    assert (found.homes, found.known) == ((), False)


async def test_a_user_held_only_here_has_no_homes_but_is_known() -> None:
    router, locator, _, _ = dht_router()
    locator.bindings[BOB] = [HomeRecord(HOME)]
    found = await router.route(BOB, RURI)
    assert (found.homes, found.known) == ((), True)


async def test_a_user_whose_bindings_all_went_away_is_known() -> None:
    # Tombstones: the user registered lately, so "not reachable now", not "no such user".
    router, locator, _, clock = dht_router()
    locator.bindings[BOB] = [HomeRecord(SITE_B, expires_at=clock() - 1)]
    found = await router.route(BOB, RURI)
    assert (found.homes, found.known) == ((), True)


async def test_the_relay_mark_replaces_one_already_there() -> None:
    router, locator, _, _ = dht_router()
    locator.bindings[BOB] = [HomeRecord(SITE_B)]
    found = await router.route(BOB, sip_uri("sip:bob@example.com;p2psip=other;user=phone"))
    assert found.ruri == "sip:bob@example.com;user=phone;p2psip=home"


@pytest.mark.parametrize("home", ["tel:+15551234", "not a uri at all", "<sip:x>", "http://x"])
async def test_a_home_that_is_not_a_sip_uri_is_skipped(home: str) -> None:
    router, locator, _, _ = dht_router()
    locator.bindings[BOB] = [HomeRecord(home, q=1.0), HomeRecord(SITE_B, q=0.5)]
    found = await router.route(BOB, RURI)
    assert [str(h) for h in found.homes] == [SITE_B]


async def test_only_bad_homes_is_no_home() -> None:
    router, locator, _, _ = dht_router()
    locator.bindings[BOB] = [HomeRecord("tel:+15551234")]
    assert (await router.route(BOB, RURI)).homes == ()


async def test_a_second_route_is_a_cache_hit() -> None:
    router, locator, counters, _ = dht_router()
    locator.bindings[BOB] = [HomeRecord(SITE_B)]
    await router.route(BOB, RURI)
    locator.bindings[BOB] = [HomeRecord(SITE_C)]  # moved; the cache does not know yet
    found = await router.route(BOB, RURI)
    assert found.from_cache
    assert [str(h) for h in found.homes] == [SITE_B]
    assert locator.lookups == [BOB]
    assert counters.dht_lookups == 1
    assert (router.cache.hits, router.cache.misses) == (1, 1)


async def test_fresh_bypasses_the_cache() -> None:
    router, locator, counters, _ = dht_router()
    locator.bindings[BOB] = [HomeRecord(SITE_B)]
    await router.route(BOB, RURI)
    locator.bindings[BOB] = [HomeRecord(SITE_C)]
    found = await router.route(BOB, RURI, fresh=True)
    assert not found.from_cache
    assert [str(h) for h in found.homes] == [SITE_C]
    assert counters.dht_lookups == 2
    # ... and what it found is what the next call uses.
    again = await router.route(BOB, RURI)
    assert again.from_cache
    assert [str(h) for h in again.homes] == [SITE_C]


async def test_failed_drops_the_entry() -> None:
    router, locator, counters, _ = dht_router()
    locator.bindings[BOB] = [HomeRecord(SITE_B)]
    await router.route(BOB, RURI)
    router.failed(BOB)
    router.failed("sip:nobody@example.com")  # nothing cached: nothing to do
    found = await router.route(BOB, RURI)
    assert not found.from_cache
    assert counters.dht_lookups == 2


async def test_entries_last_the_cache_ttl_after_their_last_use() -> None:
    router, locator, counters, clock = dht_router(ttl=10.0)
    locator.bindings[BOB] = [HomeRecord(SITE_B)]
    await router.route(BOB, RURI)
    clock.advance(9.9)
    assert (await router.route(BOB, RURI)).from_cache
    clock.advance(9.9)  # a hit refreshed it: calls 9.9 s apart keep using it
    assert (await router.route(BOB, RURI)).from_cache
    clock.advance(10.1)  # unused for longer than the ttl
    assert not (await router.route(BOB, RURI)).from_cache
    assert counters.dht_lookups == 2


async def test_a_busy_entry_is_looked_up_again_after_its_max_age() -> None:
    router, locator, counters, clock = dht_router(ttl=10.0)  # max age: 100 s
    locator.bindings[BOB] = [HomeRecord(SITE_B)]
    await router.route(BOB, RURI)
    for _ in range(11):  # up to 99 s after the lookup, every call hits
        clock.advance(9.0)
        assert (await router.route(BOB, RURI)).from_cache
    clock.advance(9.0)  # 108 s
    assert not (await router.route(BOB, RURI)).from_cache
    assert counters.dht_lookups == 2


async def test_a_cached_binding_that_expired_is_not_used() -> None:
    router, locator, counters, clock = dht_router(ttl=60.0)
    locator.bindings[BOB] = [HomeRecord(SITE_B, expires_at=clock() + 5)]
    await router.route(BOB, RURI)
    clock.advance(6)
    assert (await router.route(BOB, RURI)).homes == ()  # the DHT lets it expire too
    assert counters.dht_lookups == 2


async def test_not_found_is_not_cached() -> None:
    router, locator, counters, _ = dht_router()
    assert (await router.route(BOB, RURI)).homes == ()
    locator.bindings[BOB] = [HomeRecord(SITE_B)]  # bob registers at site B
    assert (await router.route(BOB, RURI)).homes != ()
    assert counters.dht_lookups == 2


async def test_lookup_errors_propagate_and_are_not_cached() -> None:
    router, locator, counters, _ = dht_router()
    locator.failure = LocationUnavailable("no node answered")
    with pytest.raises(LocationUnavailable) as caught:
        await router.route(BOB, RURI)
    assert caught.value.status_code == 503
    assert ("Retry-After", "5") in caught.value.headers
    locator.failure = None
    locator.bindings[BOB] = [HomeRecord(SITE_B)]
    found = await router.route(BOB, RURI)
    assert not found.from_cache
    assert counters.dht_lookups == 2


async def test_a_trust_change_drops_what_the_cache_holds_of_a_removed_key() -> None:
    router, locator, _, _ = dht_router()
    locator.bindings[BOB] = [HomeRecord(SITE_B, key_id="b" * 16), HomeRecord(SITE_C)]
    await router.route(BOB, RURI)
    # What build_site wires to TrustStore.on_change: keep what the trust still allows.
    assert router.cache.retain(lambda aor, b: b.key_id != "b" * 16) == 1
    found = await router.route(BOB, RURI)
    assert found.from_cache and [str(h) for h in found.homes] == [SITE_C]

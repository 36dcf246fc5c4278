"""RecordStore contract: merge_in verifies and merges untrusted records, in memory and in Redis.

Every test runs against both stores; Redis is a real redis-server (``redis_server``).
Times are a manual clock near the real time: Redis expires keys by wall-clock time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from dht_adaptor import record_store
from dht_adaptor.keys import SiteKey, TrustStore, sign_binding
from dht_adaptor.record import (
    DhtBinding,
    decode_record,
    dht_key,
    encode_record,
    live,
    new_binding,
    tombstone_of,
)
from dht_adaptor.record_store import (
    MemoryRecordStore,
    RecordStore,
    RecordStoreError,
    RedisRecordStore,
)
from tests.support.redis_server import RedisServer

ALICE = "sip:alice@example.com"
BOB = "sip:bob@example.com"
KEY = dht_key(ALICE)


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Sites:
    a: SiteKey
    b: SiteKey
    stranger: SiteKey  # a key nobody trusts
    trust: TrustStore


@pytest.fixture(scope="module")
def sites() -> Sites:
    a, b, stranger = SiteKey.generate(), SiteKey.generate(), SiteKey.generate()
    trust = TrustStore({a.key_id: a.public_bytes, b.key_id: b.public_bytes})
    return Sites(a, b, stranger, trust)


@pytest.fixture
def clock() -> Clock:
    return Clock()


Factory = Callable[[], RecordStore]


@pytest.fixture(params=["memory", "redis"])
async def make_store(
    request: pytest.FixtureRequest, sites: Sites
) -> AsyncIterator[Callable[[], RecordStore]]:
    """Makes stores of one kind; Redis ones share one server (like a restarted node)."""
    made: list[RecordStore] = []
    if request.param == "memory":
        shared = MemoryRecordStore(sites.trust)

        def factory() -> RecordStore:
            return shared

    else:
        server: RedisServer = request.getfixturevalue("redis_server")

        def factory() -> RecordStore:
            store = RedisRecordStore(server.url, sites.trust)
            made.append(store)
            return store

    yield factory
    for store in made:
        await store.close()


@pytest.fixture
def store(make_store: Factory) -> RecordStore:
    return make_store()


def bind(
    key: SiteKey,
    clock: Clock,
    contact: str,
    *,
    aor: str = ALICE,
    site: str = "paris",
    version: int = 1,
    expires: float = 3600,
) -> DhtBinding:
    unsigned = new_binding(
        aor=aor,
        contact=contact,
        home=f"sip:proxy.{site}.example.com",
        site=site,
        version=version,
        now=clock.now,
        expires=expires,
    )
    return sign_binding(unsigned, key)


def contacts(bindings: tuple[DhtBinding, ...]) -> list[str]:
    return sorted(b.contact for b in bindings)


async def test_two_sites_bindings_both_survive(
    store: RecordStore, sites: Sites, clock: Clock
) -> None:
    paris = bind(sites.a, clock, "sip:alice@10.0.0.1")
    tokyo = bind(sites.b, clock, "sip:alice@10.9.0.1", site="tokyo")
    first = await store.merge_in(KEY, encode_record([paris]), clock.now)
    second = await store.merge_in(KEY, encode_record([tokyo]), clock.now)
    assert (first.ok, first.accepted, first.held) == (True, 1, 1)
    assert (second.ok, second.accepted, second.held) == (True, 1, 2)
    assert set(await store.get(KEY, clock.now)) == {paris, tokyo}
    assert (store.accepted, store.rejected) == (2, 0)


async def test_highest_version_wins_in_any_order(
    store: RecordStore, sites: Sites, clock: Clock
) -> None:
    v1 = bind(sites.a, clock, "sip:alice@10.0.0.1", version=1)
    v2 = sign_binding(dataclasses.replace(v1, version=2, q=0.5), sites.a)
    await store.merge_in(KEY, encode_record([v2]), clock.now)
    await store.merge_in(KEY, encode_record([v1]), clock.now)  # late, older copy
    assert await store.get(KEY, clock.now) == (v2,)
    v3 = sign_binding(dataclasses.replace(v1, version=3, q=0.2), sites.a)
    await store.merge_in(KEY, encode_record([v3]), clock.now)
    assert await store.get(KEY, clock.now) == (v3,)


async def test_tombstone_hides_exactly_its_binding(
    store: RecordStore, sites: Sites, clock: Clock
) -> None:
    desk = bind(sites.a, clock, "sip:desk@10.0.0.1")
    mobile = bind(sites.a, clock, "sip:mobile@10.0.0.2")
    tokyo = bind(sites.b, clock, "sip:alice@10.9.0.1", site="tokyo")
    await store.merge_in(KEY, encode_record([desk, mobile]), clock.now)
    await store.merge_in(KEY, encode_record([tokyo]), clock.now)
    gone = sign_binding(tombstone_of(desk, version=2), sites.a)
    assert (await store.merge_in(KEY, encode_record([gone]), clock.now)).ok
    held = await store.get(KEY, clock.now)
    assert gone in held  # tombstones are held and served, so they propagate
    assert contacts(live(held, clock.now)) == ["sip:alice@10.9.0.1", "sip:mobile@10.0.0.2"]
    # The hidden binding arriving again (a stale replica) does not come back.
    await store.merge_in(KEY, encode_record([desk]), clock.now)
    assert contacts(live(await store.get(KEY, clock.now), clock.now)) == [
        "sip:alice@10.9.0.1",
        "sip:mobile@10.0.0.2",
    ]


def forgeries(sites: Sites, clock: Clock) -> dict[str, DhtBinding]:
    real = bind(sites.a, clock, "sip:alice@10.0.0.1")
    return {
        # a trusted key id, but the contact was changed after signing
        "forged": dataclasses.replace(real, contact="sip:evil@203.0.113.66", version=99),
        "unsigned": dataclasses.replace(real, key_id="", signature=b""),
        "untrusted": bind(sites.stranger, clock, "sip:evil@203.0.113.66", version=99),
        # a signature by a trusted site, but under a trusted key id it was not made with
        "wrong signer": dataclasses.replace(
            bind(sites.b, clock, "sip:evil@203.0.113.66"), key_id=sites.a.key_id
        ),
    }


async def test_a_replica_sent_again_is_taken_without_checking_it_again(
    store: RecordStore, sites: Sites, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Replication to a new contact resends records it mostly holds already: only the
    # bindings it does not hold cost a signature check.
    paris = bind(sites.a, clock, "sip:alice@10.0.0.1")
    tokyo = bind(sites.b, clock, "sip:alice@10.9.0.1", site="tokyo")
    await store.merge_in(KEY, encode_record([paris]), clock.now)
    checked: list[DhtBinding] = []
    real_filter = sites.trust.filter

    def counting_filter(bindings):  # type: ignore[no-untyped-def]
        bindings = list(bindings)
        checked.extend(bindings)
        return real_filter(bindings)

    monkeypatch.setattr(sites.trust, "filter", counting_filter)
    again = await store.merge_in(KEY, encode_record([paris]), clock.now)
    assert (again.ok, again.accepted, again.held) == (True, 1, 1)
    assert checked == []
    both = await store.merge_in(KEY, encode_record([paris, tokyo]), clock.now)
    assert (both.ok, both.accepted, both.held) == (True, 2, 2)
    assert checked == [tokyo]
    assert set(await store.get(KEY, clock.now)) == {paris, tokyo}


async def test_a_held_binding_sent_again_after_its_key_lost_trust_is_refused(
    sites: Sites, clock: Clock
) -> None:
    trust = TrustStore({sites.a.key_id: sites.a.public_bytes})
    store = MemoryRecordStore(trust)
    paris = bind(sites.a, clock, "sip:alice@10.0.0.1")
    assert (await store.merge_in(KEY, encode_record([paris]), clock.now)).ok
    trust.replace([])
    again = await store.merge_in(KEY, encode_record([paris]), clock.now)
    assert (again.ok, again.accepted, again.rejected) == (False, 0, 1)
    assert await store.get(KEY, clock.now) == ()


@pytest.mark.parametrize("kind", ["forged", "unsigned", "untrusted", "wrong signer"])
async def test_unverifiable_bindings_are_rejected_and_counted(
    store: RecordStore, sites: Sites, clock: Clock, kind: str
) -> None:
    bad = forgeries(sites, clock)[kind]
    result = await store.merge_in(KEY, encode_record([bad]), clock.now)
    assert (result.ok, result.accepted, result.rejected, result.held) == (False, 0, 1, 0)
    assert await store.get(KEY, clock.now) == ()
    assert (store.accepted, store.rejected) == (0, 1)


async def test_binding_of_another_aor_is_rejected(
    store: RecordStore, sites: Sites, clock: Clock
) -> None:
    bobs = bind(sites.a, clock, "sip:bob@10.0.0.7", aor=BOB)  # validly signed, wrong key
    result = await store.merge_in(KEY, encode_record([bobs]), clock.now)
    assert (result.ok, result.rejected) == (False, 1)
    assert await store.get(KEY, clock.now) == ()
    assert await store.get(dht_key(BOB), clock.now) == ()


async def test_good_bindings_of_a_mixed_record_are_kept(
    store: RecordStore, sites: Sites, clock: Clock
) -> None:
    good = bind(sites.b, clock, "sip:alice@10.9.0.1", site="tokyo")
    bad = forgeries(sites, clock)
    record = encode_record([good, bad["forged"], bad["untrusted"]])
    result = await store.merge_in(KEY, record, clock.now)
    assert (result.ok, result.accepted, result.rejected) == (False, 1, 2)
    assert await store.get(KEY, clock.now) == (good,)


@pytest.mark.parametrize(
    "value",
    [b"", b"garbage", b"\xff\xfe", b"{}", b'{"v":2,"b":[]}', b"[1,2,3]", "a str", None, 42],
)
async def test_unreadable_records_are_rejected(
    store: RecordStore, clock: Clock, value: object
) -> None:
    result = await store.merge_in(KEY, value, clock.now)  # type: ignore[arg-type]
    assert (result.ok, result.accepted, result.rejected) == (False, 0, 1)
    assert store.rejected == 1
    assert await store.count() == 0


async def test_a_key_that_is_not_a_digest_is_rejected(
    store: RecordStore, sites: Sites, clock: Clock
) -> None:
    record = encode_record([bind(sites.a, clock, "sip:alice@10.0.0.1")])
    for key in (b"short", KEY + b"x"):
        assert not (await store.merge_in(key, record, clock.now)).ok
    assert await store.count() == 0


async def test_expired_bindings_are_forgotten(
    store: RecordStore, sites: Sites, clock: Clock
) -> None:
    short = bind(sites.a, clock, "sip:alice@10.0.0.1", expires=60)
    long = bind(sites.b, clock, "sip:alice@10.9.0.1", site="tokyo", expires=600)
    await store.merge_in(KEY, encode_record([short, long]), clock.now)
    clock.now += 61
    assert await store.get(KEY, clock.now) == (long,)
    assert [(k, b) async for k, b in store.items(clock.now)] == [(KEY, (long,))]
    # An already-expired binding arriving late is not stored.
    assert (await store.merge_in(KEY, encode_record([short]), clock.now)).held == 1
    clock.now += 600
    assert await store.get(KEY, clock.now) == ()
    assert [k async for k, _ in store.items(clock.now)] == []


async def test_memory_sweep_drops_expired_keys(sites: Sites, clock: Clock) -> None:
    store = MemoryRecordStore(sites.trust)
    await store.merge_in(
        KEY, encode_record([bind(sites.a, clock, "sip:a@h", expires=60)]), clock.now
    )
    bobs = encode_record([bind(sites.a, clock, "sip:b@h", aor=BOB, expires=600)])
    await store.merge_in(dht_key(BOB), bobs, clock.now)
    assert await store.count() == 2
    assert await store.sweep(clock.now + 61) == 1
    assert await store.count() == 1
    assert await store.sweep(clock.now + 601) == 1
    assert await store.count() == 0


async def test_memory_sweep_looks_only_at_keys_with_something_expired(
    sites: Sites, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An idle node sweeps every minute: its work must not grow with the records it holds.
    store = MemoryRecordStore(sites.trust)
    for n in range(300):
        aor = f"sip:user{n}@example.com"
        expires = 60 if n < 3 else 600
        record = encode_record([bind(sites.a, clock, f"sip:{n}@h", aor=aor, expires=expires)])
        assert (await store.merge_in(dht_key(aor), record, clock.now)).ok
    merged = []
    real_merge = record_store.merge

    def counting_merge(*sets, **kwargs):  # type: ignore[no-untyped-def]
        merged.append(1)
        return real_merge(*sets, **kwargs)

    monkeypatch.setattr(record_store, "merge", counting_merge)
    assert await store.sweep(clock.now + 30) == 0
    assert merged == []
    assert await store.sweep(clock.now + 61) == 3
    assert len(merged) == 3
    assert await store.count() == 297


async def test_items_and_count(store: RecordStore, sites: Sites, clock: Clock) -> None:
    alice = bind(sites.a, clock, "sip:alice@10.0.0.1")
    bob = bind(sites.a, clock, "sip:bob@10.0.0.2", aor=BOB)
    await store.merge_in(KEY, encode_record([alice]), clock.now)
    await store.merge_in(dht_key(BOB), encode_record([bob]), clock.now)
    assert await store.count() == 2
    held = {k: b async for k, b in store.items(clock.now)}
    assert held == {KEY: (alice,), dht_key(BOB): (bob,)}


async def test_concurrent_merges_into_one_key_lose_nothing(
    store: RecordStore, sites: Sites, clock: Clock
) -> None:
    bindings = [
        bind(sites.a if i % 2 else sites.b, clock, f"sip:alice@10.0.0.{i}") for i in range(24)
    ]
    results = await asyncio.gather(
        *(store.merge_in(KEY, encode_record([b]), clock.now) for b in bindings)
    )
    assert all(r.ok for r in results)
    assert set(await store.get(KEY, clock.now)) == set(bindings)


async def test_merged_record_over_the_limit_is_refused(
    store: RecordStore, sites: Sites, clock: Clock
) -> None:
    # record.MAX_BINDINGS (64) bindings fit one held record; the 65th is refused whole.
    bindings = [bind(sites.a, clock, f"sip:alice@10.0.{i // 200}.{i % 200}") for i in range(65)]
    for start in range(0, 64, 16):
        assert (
            await store.merge_in(KEY, encode_record(bindings[start : start + 16]), clock.now)
        ).ok
    result = await store.merge_in(KEY, encode_record(bindings[64:]), clock.now)
    assert (result.ok, result.held) == (False, 64)
    assert len(await store.get(KEY, clock.now)) == 64


# -- Redis specifics -------------------------------------------------------------------


async def test_redis_key_expires_with_its_latest_binding(
    redis_server: RedisServer, sites: Sites, clock: Clock
) -> None:
    store = RedisRecordStore(redis_server.url, sites.trust, prefix="test:dht:")
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        early = bind(sites.a, clock, "sip:alice@10.0.0.1", expires=600)
        late = bind(sites.b, clock, "sip:alice@10.9.0.1", site="tokyo", expires=1200.5)
        await store.merge_in(KEY, encode_record([early, late]), clock.now)
        name = f"test:dht:{KEY.hex()}"
        assert store.redis_key(KEY) == name
        assert await client.pexpiretime(name) == math.ceil(late.expires_at * 1000)
        assert 0 < await client.pttl(name) <= 1200.5 * 1000 + 2000
        raw = await client.get(name)
        assert isinstance(raw, bytes)
        assert set(decode_record(raw)) == {early, late}
    finally:
        await client.aclose()
        await store.close()


async def test_redis_restart_keeps_what_the_node_held(
    redis_server: RedisServer, sites: Sites, clock: Clock
) -> None:
    before = RedisRecordStore(redis_server.url, sites.trust)
    alice = bind(sites.a, clock, "sip:alice@10.0.0.1")
    await before.merge_in(KEY, encode_record([alice]), clock.now)
    await before.close()
    redis_server.restart(graceful=False)  # a crash: the AOF keeps acknowledged writes
    after = RedisRecordStore(redis_server.url, sites.trust)
    try:
        assert await after.get(KEY, clock.now) == (alice,)
        assert [k async for k, _ in after.items(clock.now)] == [KEY]
    finally:
        await after.close()


async def test_redis_failure_is_a_record_store_error(
    redis_server: RedisServer, sites: Sites, clock: Clock
) -> None:
    store = RedisRecordStore(redis_server.url, sites.trust, timeout=0.5)
    redis_server.stop()
    record = encode_record([bind(sites.a, clock, "sip:alice@10.0.0.1")])
    try:
        with pytest.raises(RecordStoreError, match=r"redis at 127\.0\.0\.1"):
            await store.merge_in(KEY, record, clock.now)
        with pytest.raises(RecordStoreError):
            await store.get(KEY, clock.now)
    finally:
        await store.close()


async def test_damaged_redis_value_is_treated_as_empty(
    redis_server: RedisServer, sites: Sites, clock: Clock
) -> None:
    store = RedisRecordStore(redis_server.url, sites.trust)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set(store.redis_key(KEY), b"not a record")
        assert await store.get(KEY, clock.now) == ()
        alice = bind(sites.a, clock, "sip:alice@10.0.0.1")
        assert (await store.merge_in(KEY, encode_record([alice]), clock.now)).ok
        assert await store.get(KEY, clock.now) == (alice,)
    finally:
        await client.aclose()
        await store.close()


def test_bad_redis_url_is_refused(sites: Sites) -> None:
    with pytest.raises(ValueError):
        RedisRecordStore("http://localhost", sites.trust)

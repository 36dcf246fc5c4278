"""Contract tests for every LocationStore, Redis-specific behaviour, and the record codec.

Times are passed in explicitly (a manual clock). They start from the real wall clock only
because Redis expires keys at absolute wall-clock times: a binding "expiring" in 1970
would make Redis drop the key at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dht_adaptor.codec import (
    CodecError,
    decode_binding,
    decode_bindings,
    encode_binding,
    encode_bindings,
)
from dht_adaptor.location import MemoryStore
from dht_adaptor.redis_store import RedisStore
from proxy.location import Binding, LocationError, LocationStore
from tests.support.redis_server import RedisServer

ALICE = "sip:alice@example.com"
BOB = "sip:bob@example.com"
CAROL = "sip:carol@example.com"


def full_binding(aor: str, n: int, expires_at: float) -> Binding:
    """A binding with every field set to a non-default value."""
    return Binding(
        aor=aor,
        contact=f"sip:{n}@192.0.2.{n};transport=tcp;ob",
        expires_at=expires_at,
        q=0.5 + n / 100,
        call_id=f"call-{n}@phone",
        cseq=100 + n,
        source=f"tcp:198.51.100.{n}:5060",
        instance=f'"<urn:uuid:00000000-0000-0000-0000-00000000000{n}>"',
        reg_id=n,
        path=(f"<sip:edge{n}.example.com;lr>", "<sip:core.example.com;lr>"),
        registered_at=expires_at - 3600.25,
    )


@pytest.fixture
def t0() -> float:
    """The manual clock's start: now, on the wall clock (see the module docstring)."""
    return float(int(time.time()))


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[LocationStore]:
    s: LocationStore
    if request.param == "memory":
        s = MemoryStore()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisStore(server.url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test server, to look behind the store's back."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def all_aors(s: LocationStore) -> list[str]:
    return [aor async for aor in s.aors()]


# -- the contract, for every store ---------------------------------------------------------


async def test_round_trip_keeps_every_field_and_order(store: LocationStore, t0: float) -> None:
    bindings = [full_binding(ALICE, n, t0 + 600 * n) for n in (3, 1, 2)]
    await store.save(ALICE, bindings, now=t0)
    assert await store.load(ALICE, now=t0) == bindings


async def test_unknown_aor_loads_empty(store: LocationStore, t0: float) -> None:
    assert await store.load("sip:nobody@example.com", now=t0) == []


async def test_load_filters_expired_by_now(store: LocationStore, t0: float) -> None:
    short, long = full_binding(ALICE, 1, t0 + 60), full_binding(ALICE, 2, t0 + 600)
    await store.save(ALICE, [short, long], now=t0)
    assert await store.load(ALICE, now=t0 + 59.9) == [short, long]
    assert await store.load(ALICE, now=t0 + 60) == [long]  # expired at its expires_at
    assert await store.load(ALICE, now=t0 + 600) == []


async def test_save_drops_bindings_already_expired(store: LocationStore, t0: float) -> None:
    stale, live = full_binding(ALICE, 1, t0 + 10), full_binding(ALICE, 2, t0 + 600)
    await store.save(ALICE, [stale, live], now=t0 + 20)
    assert await store.load(ALICE, now=t0) == [live]


async def test_save_replaces_the_whole_set(store: LocationStore, t0: float) -> None:
    await store.save(ALICE, [full_binding(ALICE, 1, t0 + 60)], now=t0)
    replacement = [full_binding(ALICE, 2, t0 + 30)]
    await store.save(ALICE, replacement, now=t0)
    assert await store.load(ALICE, now=t0) == replacement


@pytest.mark.parametrize("later", [0.0, 100.0], ids=["empty", "all-expired"])
async def test_save_without_live_bindings_deletes_the_aor(
    store: LocationStore, t0: float, later: float
) -> None:
    await store.save(ALICE, [full_binding(ALICE, 1, t0 + 60)], now=t0)
    bindings = [] if later == 0.0 else [full_binding(ALICE, 1, t0 + 60)]
    await store.save(ALICE, bindings, now=t0 + later)
    assert await store.load(ALICE, now=t0) == []
    assert await all_aors(store) == []


async def test_aors_lists_exactly_the_aors_with_bindings(store: LocationStore, t0: float) -> None:
    assert await all_aors(store) == []
    for n, aor in enumerate((ALICE, BOB, CAROL, "sip:dave@example.com"), start=1):
        await store.save(aor, [full_binding(aor, n, t0 + 60)], now=t0)
    await store.save("sip:dave@example.com", [], now=t0)
    aors = await all_aors(store)
    assert sorted(aors) == [ALICE, BOB, CAROL]


async def test_aors_yields_each_aor_once_over_many(store: LocationStore, t0: float) -> None:
    expected = {f"sip:user{i}@example.com" for i in range(1200)}  # several SCAN pages
    for aor in expected:
        await store.save(aor, [full_binding(aor, 1, t0 + 60)], now=t0)
    aors = await all_aors(store)
    assert len(aors) == len(expected)
    assert set(aors) == expected


# -- Redis: layout and expiry --------------------------------------------------------------


async def test_redis_key_expires_at_the_latest_binding(
    redis_server: RedisServer, raw: aioredis.Redis, t0: float
) -> None:
    store = RedisStore(redis_server.url)
    try:
        latest = t0 + 300.0004
        await store.save(
            ALICE, [full_binding(ALICE, 1, t0 + 100), full_binding(ALICE, 2, latest)], now=t0
        )
        key = store.key(ALICE)
        assert key == "p2psip:aor:" + ALICE
        assert await raw.pexpiretime(key) == math.ceil(latest * 1000)
        before = time.time()
        remaining_ms = await raw.pttl(key)
        # PTTL counts from Redis's clock, read after `before`: at most this, never much less.
        most_ms = math.ceil(latest * 1000) - before * 1000
        assert most_ms - 5000 < remaining_ms <= most_ms + 1
    finally:
        await store.close()


async def test_redis_key_vanishes_by_itself_when_the_latest_binding_expires(
    redis_server: RedisServer, raw: aioredis.Redis
) -> None:
    store = RedisStore(redis_server.url)
    try:
        now = time.time()
        await store.save(ALICE, [full_binding(ALICE, 1, now + 1.0)], now=now)
        key = store.key(ALICE)
        assert await raw.exists(key) == 1
        deadline = time.monotonic() + 5.0
        while await raw.exists(key) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await raw.exists(key) == 0
        assert time.time() >= now + 1.0  # not earlier than the binding's expiry
        assert await all_aors(store) == []
    finally:
        await store.close()


async def test_redis_prefixes_isolate_stores(redis_server: RedisServer, t0: float) -> None:
    # Glob characters in the prefix must not widen SCAN MATCH.
    a, b = (
        RedisStore(redis_server.url, prefix="site[a]*:"),
        RedisStore(redis_server.url, prefix="sitea:"),
    )
    try:
        await a.save(ALICE, [full_binding(ALICE, 1, t0 + 60)], now=t0)
        await b.save(BOB, [full_binding(BOB, 1, t0 + 60)], now=t0)
        assert await all_aors(a) == [ALICE]
        assert await all_aors(b) == [BOB]
        assert await b.load(ALICE, now=t0) == []
    finally:
        await a.close()
        await b.close()


# -- Redis: durability ---------------------------------------------------------------------


async def test_redis_data_survives_a_new_store_instance(
    redis_server: RedisServer, t0: float
) -> None:
    bindings = [full_binding(ALICE, n, t0 + 60 * n) for n in (1, 2)]
    first = RedisStore(redis_server.url)
    await first.save(ALICE, bindings, now=t0)
    await first.close()
    second = RedisStore(redis_server.url)
    try:
        assert await second.load(ALICE, now=t0) == bindings
        assert await all_aors(second) == [ALICE]
    finally:
        await second.close()


@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
async def test_redis_data_survives_a_server_restart(
    redis_server: RedisServer, t0: float, graceful: bool
) -> None:
    bindings = [full_binding(ALICE, n, t0 + 600 * n) for n in (1, 2)]
    store = RedisStore(redis_server.url)
    try:
        await store.save(ALICE, bindings, now=t0)
        redis_server.restart(graceful=graceful)
        # The pooled connection died with the server; the store reconnects by itself.
        assert await store.load(ALICE, now=t0) == bindings
        await store.ping()
    finally:
        await store.close()
    fresh = RedisStore(redis_server.url)
    try:
        assert await fresh.load(ALICE, now=t0) == bindings
    finally:
        await fresh.close()


# -- Redis: failures -----------------------------------------------------------------------


async def test_redis_down_raises_location_error(redis_server: RedisServer, t0: float) -> None:
    used = RedisStore(redis_server.url)  # has a pooled connection when the server dies
    await used.ping()
    # Credentials in the URL must never reach an error message.
    secret = RedisStore(f"redis://proxy:s3cr3t-pw@127.0.0.1:{redis_server.port}/0")
    redis_server.stop()
    try:
        for store in (used, secret):
            started = time.monotonic()
            with pytest.raises(LocationError, match=r"load 'sip:alice@example.com' failed") as err:
                await store.load(ALICE, now=t0)
            assert "s3cr3t" not in str(err.value)
            assert f"127.0.0.1:{redis_server.port}/0" in str(err.value)
            with pytest.raises(LocationError, match="save"):
                await store.save(ALICE, [full_binding(ALICE, 1, t0 + 60)], now=t0)
            with pytest.raises(LocationError, match="delete"):
                await store.save(ALICE, [], now=t0)
            with pytest.raises(LocationError, match="scan"):
                await all_aors(store)
            with pytest.raises(LocationError, match="ping"):
                await store.ping()
            assert time.monotonic() - started < 2.0  # refused connections fail fast
    finally:
        await used.close()
        await secret.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_redis_that_never_answers_times_out(silent_port: int, t0: float) -> None:
    store = RedisStore(f"redis://127.0.0.1:{silent_port}/0", timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(LocationError, match="Timeout"):
            await store.load(ALICE, now=t0)
        assert time.monotonic() - started < 2.0
    finally:
        await store.close()


async def test_unreadable_record_raises_location_error(
    redis_server: RedisServer, raw: aioredis.Redis, t0: float
) -> None:
    store = RedisStore(redis_server.url)
    try:
        await raw.set(store.key(ALICE), b'{"v":1,"bindings":[{"aor":42}]}')
        with pytest.raises(LocationError, match="unreadable record"):
            await store.load(ALICE, now=t0)
    finally:
        await store.close()


async def test_unencodable_binding_raises_location_error(
    redis_server: RedisServer, t0: float
) -> None:
    store = RedisStore(redis_server.url)
    try:
        with pytest.raises(LocationError, match="cannot store"):
            await store.save(ALICE, [Binding(ALICE, "sip:a@h", t0 + 60, q=7.0)], now=t0)
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/0",
        "127.0.0.1:6379",
        "redis://user:s3cr3t-pw@127.0.0.1:notaport/0",
        "unix://",
        "redis://127.0.0.1:6379/0?colour=red",
        "redis://127.0.0.1:6379/0?decode_responses=1",
        "redis://127.0.0.1:6379/0?db=zero",
    ],
)
def test_bad_url_is_refused_early(url: str) -> None:
    with pytest.raises(ValueError, match="redis") as err:
        RedisStore(url)
    message = str(err.value)
    assert "\n" not in message
    assert "s3cr3t" not in message


def test_store_repr_hides_credentials() -> None:
    store = RedisStore("redis://proxy:s3cr3t-pw@10.0.0.1:6380/2")
    assert repr(store) == "RedisStore('10.0.0.1:6380/2', prefix='p2psip:')"


# -- codec ---------------------------------------------------------------------------------

# Generous limits: other suites may load this machine, and a slow draw is not a bug.
robust = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_time = st.floats(min_value=0, max_value=4e9, allow_nan=False)

bindings_st = st.builds(
    Binding,
    aor=_text.filter(bool),
    contact=_text.filter(bool),
    expires_at=_time,
    q=st.floats(min_value=0.0, max_value=1.0),
    call_id=_text,
    cseq=st.integers(min_value=0, max_value=2**32 - 1),
    source=_text,
    instance=st.none() | _text,
    reg_id=st.none() | st.integers(min_value=0, max_value=2**32 - 1),
    path=st.lists(_text, max_size=3).map(tuple),
    registered_at=_time,
)


@robust
@given(bindings_st)
def test_codec_round_trips_a_binding(binding: Binding) -> None:
    assert decode_binding(encode_binding(binding)) == binding


@robust
@given(st.lists(bindings_st, max_size=5))
def test_codec_round_trips_a_list(bindings: list[Binding]) -> None:
    assert decode_bindings(encode_bindings(bindings)) == bindings


def test_codec_output_is_compact_and_versioned() -> None:
    binding = Binding("sip:alice@example.com", "sip:alice@192.0.2.4", 1700000000.5)
    assert encode_binding(binding) == (
        b'{"v":1,"aor":"sip:alice@example.com","contact":"sip:alice@192.0.2.4",'
        b'"expires_at":1700000000.5}'
    )
    assert encode_bindings([binding, full_binding(ALICE, 1, 1e9)]).startswith(
        b'{"v":1,"bindings":[{"aor":'
    )
    decoded = json.loads(encode_bindings([full_binding(ALICE, 1, 1e9)]))
    assert decoded["bindings"][0]["path"] == list(full_binding(ALICE, 1, 1e9).path)


_GOOD = {"aor": "sip:a@h", "contact": "sip:a@1.2.3.4", "expires_at": 10}


def _record(**changes: object) -> bytes:
    binding = {k: v for k, v in {**_GOOD, **changes}.items() if v is not ...}
    return json.dumps({"v": 1, "bindings": [binding]}).encode()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
        pytest.param(b'{"bindings":[]}', id="no-version"),
        pytest.param(b'{"v":2,"bindings":[]}', id="future-version"),
        pytest.param(b'{"v":true,"bindings":[]}', id="bool-version"),
        pytest.param(b'{"v":1,"v":1,"bindings":[]}', id="duplicate-field"),
        pytest.param(b'{"v":1,"bindings":{}}', id="bindings-not-list"),
        pytest.param(b'{"v":1,"bindings":[[]]}', id="binding-not-object"),
        pytest.param(b'{"v":1,"bindings":[],"x":1}', id="unknown-envelope-field"),
        pytest.param(_record(aor=...), id="missing-aor"),
        pytest.param(_record(contact=""), id="empty-contact"),
        pytest.param(_record(aor=7), id="aor-not-string"),
        pytest.param(_record(expires_at="10"), id="expires-string"),
        pytest.param(_record(expires_at=True), id="expires-bool"),
        pytest.param(_record(expires_at=10**400), id="expires-huge-int"),
        pytest.param(_record().replace(b"10", b"1e999"), id="expires-inf"),
        pytest.param(_record().replace(b"10", b"NaN"), id="expires-nan"),
        pytest.param(_record(q=1.5), id="q-above-1"),
        pytest.param(_record(cseq=1.0), id="cseq-float"),
        pytest.param(_record(cseq=-1), id="cseq-negative"),
        pytest.param(_record(cseq=2**32), id="cseq-too-big"),
        pytest.param(_record(reg_id="1"), id="reg-id-string"),
        pytest.param(_record(instance=1), id="instance-int"),
        pytest.param(_record(path="<sip:p>"), id="path-string"),
        pytest.param(_record(path=[1]), id="path-item-int"),
        pytest.param(_record(call_id="\ud800"), id="lone-surrogate"),
        pytest.param(_record(colour="red"), id="unknown-field"),
        pytest.param(b'{"v":1,"bindings":["' + b"1" * 5000 + b'"]}', id="string-binding"),
        pytest.param(b'{"v":1,"bindings":[{"cseq":' + b"1" * 5000 + b"}]}", id="int-digits"),
    ],
)
def test_codec_rejects_malformed_records(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_bindings(data)


def test_codec_accepts_the_minimal_record() -> None:
    assert decode_bindings(_record()) == [Binding("sip:a@h", "sip:a@1.2.3.4", 10.0)]


@pytest.mark.parametrize(
    "binding",
    [
        Binding("sip:a@h", "sip:a@1.2.3.4", math.nan),
        Binding("sip:a@h", "sip:a@1.2.3.4", math.inf),
        Binding("sip:a@h", "sip:a@1.2.3.4", 10, q=-0.1),
        Binding("sip:a@h", "", 10),
        Binding("sip:a@h", "sip:a@1.2.3.4", 10, call_id="\udc80"),
        Binding("sip:a@h", "sip:a@1.2.3.4", 10, path=["<sip:p>"]),  # type: ignore[arg-type]
    ],
)
def test_codec_refuses_to_encode_invalid_bindings(binding: Binding) -> None:
    with pytest.raises(CodecError):
        encode_bindings([binding])


@robust
@given(st.binary(max_size=200))
def test_codec_arbitrary_bytes_decode_or_raise_codec_error(data: bytes) -> None:
    for decode in (decode_binding, decode_bindings):
        with contextlib.suppress(CodecError):
            decode(data)


@robust
@given(st.lists(st.tuples(st.integers(min_value=0), st.binary(max_size=3)), min_size=1, max_size=4))
def test_codec_mutated_records_decode_or_raise_codec_error(
    edits: list[tuple[int, bytes]],
) -> None:
    # Splice random bytes into a valid record: this reaches deeper than random bytes do.
    data = bytearray(encode_bindings([full_binding(ALICE, 1, 1e9), full_binding(BOB, 2, 2e9)]))
    for position, chunk in edits:
        start = position % (len(data) + 1)
        data[start : start + len(chunk)] = chunk
    with contextlib.suppress(CodecError):
        decode_bindings(bytes(data))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
_field_names = st.sampled_from(
    ["aor", "contact", "expires_at", "q", "cseq", "reg_id", "path", "instance", "x"]
)


@robust
@given(st.dictionaries(_field_names, _json | st.sampled_from(["sip:a@h", 1.5, 3])))
def test_codec_arbitrary_fields_decode_or_raise_codec_error(fields: dict[str, object]) -> None:
    # Arbitrary bytes rarely get past the JSON parser; this drives the field checks.
    data = json.dumps({"v": 1, "bindings": [fields]}).encode()
    try:
        bindings = decode_bindings(data)
    except CodecError:
        return
    assert decode_bindings(encode_bindings(bindings)) == bindings

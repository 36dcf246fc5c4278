"""DHT records: bindings, expiry arithmetic, merge semantics, and the wire codec.

Times come from a manual clock (plain floats); nothing here reads the wall clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.utils import digest

from dht_adaptor.record import (
    MAX_BINDINGS,
    MAX_EXPIRES_IN,
    MAX_LIFETIME,
    MAX_RECORD_BYTES,
    DhtBinding,
    RecordError,
    RecordTooLarge,
    decode_record,
    dht_key,
    encode_record,
    live,
    merge,
    new_binding,
    tombstone_of,
)

ALICE = "sip:alice@example.com"
KEY_A = "aaaaaaaaaaaaaaaa"
KEY_B = "bbbbbbbbbbbbbbbb"


def binding(contact: str = "sip:alice@192.0.2.4", **fields: Any) -> DhtBinding:
    base = DhtBinding(
        aor=ALICE,
        contact=contact,
        home="sip:192.0.2.1:5060;transport=udp",
        expires_at=4600.0,
        site="paris",
        version=1,
        key_id=KEY_A,
        signature=b"s" * 64,
    )
    return dataclasses.replace(base, **fields)


def typical(n: int) -> DhtBinding:
    """A realistic signed RFC 5626 binding: what a record mostly holds."""
    return DhtBinding(
        aor=ALICE,
        contact=f"sip:alice@198.51.100.{n}:{5060 + n};transport=udp;ob",
        home="sip:192.0.2.1:5060;transport=udp",
        expires_at=1700003600.123456 + n,
        site="site-a",
        version=1700000000123456789 + n,  # time_ns-based
        key_id="0123456789abcdef",
        instance=f"<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6b{n:02x}>",
        reg_id=1,
        signature=bytes([n]) * 64,  # Ed25519 signatures are 64 bytes
    )


# -- strategies ------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30)
numbers = st.floats(0, 1e12, allow_nan=False) | st.integers(0, 10**12)


@st.composite
def bindings_of(draw: st.DrawFn, aor: str) -> DhtBinding:
    return DhtBinding(
        aor=aor,
        contact=draw(text),
        home=draw(text),
        expires_at=draw(numbers),
        site=draw(text),
        version=draw(st.integers(0, 2**63 - 1)),
        key_id=draw(st.just("") | st.text("0123456789abcdef", min_size=16, max_size=16)),
        q=draw(st.floats(0, 1) | st.sampled_from([0, 1])),
        instance=draw(st.none() | text),
        reg_id=draw(st.none() | st.integers(0, 2**32 - 1)),
        tombstone=draw(st.booleans()),
        signature=draw(st.binary(max_size=128)),
    )


records = st.builds(lambda user: f"sip:{user}@example.com", text).flatmap(
    lambda aor: st.lists(bindings_of(aor), max_size=8)
)


# -- the wire codec --------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(records)
def test_round_trip(bindings: list[DhtBinding]) -> None:
    decoded = decode_record(encode_record(bindings, max_bytes=2**20), max_bytes=2**20)
    assert decoded == tuple(bindings)
    # What was signed before the trip is what is verified after it (int 4600 -> 4600.0).
    assert [b.signing_bytes() for b in decoded] == [b.signing_bytes() for b in bindings]
    assert all(type(b.expires_at) is float and type(b.q) is float for b in decoded)


def test_format_is_compact_and_versioned() -> None:
    data = encode_record([binding()])
    obj = json.loads(data)
    assert obj["v"] == 1 and obj["a"] == ALICE
    assert set(obj["b"][0]) == {"c", "h", "e", "s", "n", "k", "g"}  # defaults left out
    assert b" " not in data.replace(b"transport=udp", b"")
    assert encode_record([]) == b'{"v":1,"b":[]}'
    assert decode_record(b'{"v":1,"b":[]}') == ()


def test_capacity_of_a_record() -> None:
    """21 typical signed bindings (instance, reg-id, 64-byte signature, 19-digit version)
    fit in MAX_RECORD_BYTES = 7000, about 330 bytes each; 22 do not."""
    fits = 0
    while True:
        try:
            encode_record([typical(n) for n in range(fits + 1)])
        except RecordTooLarge:
            break
        fits += 1
    assert fits == 21
    assert len(encode_record([typical(n) for n in range(21)])) <= MAX_RECORD_BYTES


def test_record_too_large_at_the_limit() -> None:
    bindings = [typical(n) for n in range(5)]
    size = len(encode_record(bindings, max_bytes=2**20))
    assert len(encode_record(bindings, max_bytes=size)) == size
    with pytest.raises(RecordTooLarge, match=f"{size} bytes"):
        encode_record(bindings, max_bytes=size - 1)
    too_many = [binding(f"sip:{n}@192.0.2.4", signature=b"") for n in range(MAX_BINDINGS + 1)]
    with pytest.raises(RecordTooLarge):
        encode_record(too_many, max_bytes=2**20)
    with pytest.raises(RecordTooLarge):  # nothing over 8 KiB comes through rpcudp
        decode_record(b" " * 8193)


@pytest.mark.parametrize(
    "fields",
    [
        {"expires_at": math.nan},
        {"expires_at": math.inf},
        {"expires_at": -1.0},
        {"expires_at": "4600"},
        {"q": 1.5},
        {"q": -0.1},
        {"q": True},
        {"version": -1},
        {"version": 2**63},
        {"version": True},
        {"version": 1.0},
        {"contact": ""},
        {"contact": "sip:a\x00b@x"},
        {"contact": "sip:\r\n@x"},
        {"home": "sip:\ud800@x"},
        {"site": "s" * 65},
        {"contact": "sip:" + "a" * 1100},
        {"key_id": "XYZ"},
        {"key_id": "AAAAAAAAAAAAAAAA"},
        {"signature": b"x" * 129},
        {"signature": "sig"},
        {"aor": "alice@example.com"},
        {"aor": None},
        {"reg_id": -1},
        {"reg_id": 2**32},
        {"instance": ""},
        {"tombstone": 1},
    ],
)
def test_encode_refuses_what_decode_would(fields: dict[str, Any]) -> None:
    with pytest.raises(RecordError) as exc_info:
        encode_record([binding(**fields)])
    assert not isinstance(exc_info.value, RecordTooLarge)


def test_encode_refuses_mixed_aors_and_non_bindings() -> None:
    with pytest.raises(RecordError, match="mixes AORs"):
        encode_record([binding(), binding(aor="sip:bob@example.com")])
    with pytest.raises(RecordError):
        encode_record(["not a binding"])  # type: ignore[list-item]


def test_decode_checks_the_aor_it_was_fetched_for() -> None:
    data = encode_record([binding()])
    assert decode_record(data, aor=ALICE) == (binding(),)
    with pytest.raises(RecordError, match=r"not 'sip:bob@example\.com'"):
        decode_record(data, aor="sip:bob@example.com")


GOOD = {"c": "sip:a@192.0.2.4", "h": "sip:192.0.2.1", "e": 4600.0, "s": "paris", "n": 1}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"null",
        b"[]",
        b'{"v":true,"b":[]}',
        b'{"v":2,"b":[]}',
        b'{"v":1}',
        b'{"v":1,"b":{}}',
        b'{"v":1,"b":[],"x":1}',
        b'{"v":1,"v":1,"b":[]}',
        b'{"v":1,"b":[1]}',
        b'{"v":1,"b":[{}],"a":"sip:a@x"}',
        b"[" * 5000,
        b'{"v":1,"a":"sip:a@x","b":[{"e":NaN}]}',
        b'{"v":1,"a":"sip:a@x","b":[{"c":"x","h":"x","e":1e999,"s":"x","n":1}]}',
        b'{"v":1,"a":"sip:a@x","b":[{"e":1' + b"0" * 5000 + b"}]}",
    ],
)
def test_decode_refuses_junk(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_record(data)


@pytest.mark.parametrize(
    "change",
    [
        {"a": 7},
        {"a": "bob@example.com"},
        {"e": 10**400},
        {"e": "4600"},
        {"n": 1.5},
        {"n": -1},
        {"q": 2},
        {"t": "yes"},
        {"g": 64},
        {"g": "***"},
        {"g": "é"},
        {"g": "A" * 300},
        {"x": 1},
        {"c": None},
        {"r": True},
    ],
)
def test_decode_refuses_bad_fields(change: dict[str, object]) -> None:
    item = {**GOOD, **{k: v for k, v in change.items() if k != "a"}}
    obj = {"v": 1, "a": change.get("a", ALICE), "b": [item]}
    with pytest.raises(RecordError, match=r"bindings\[0\]|'a'|aor"):
        decode_record(json.dumps(obj).encode())
    assert decode_record(json.dumps({"v": 1, "a": ALICE, "b": [GOOD]}).encode())


def test_decode_takes_any_bytes_like_but_nothing_else() -> None:
    data = encode_record([binding()])
    assert decode_record(bytearray(data)) == decode_record(memoryview(data)) == (binding(),)
    with pytest.raises(RecordError):
        decode_record(data.decode())  # type: ignore[arg-type]


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_raises_only_record_error(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        decode_record(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from([*GOOD, "k", "q", "i", "r", "t", "g", "a", "b", "v"]), json_values)
def test_decode_structured_junk_raises_only_record_error(field: str, value: object) -> None:
    """A valid record with one field replaced by any JSON value: reaches deep checks."""
    obj: dict[str, object] = {"v": 1, "a": ALICE, "b": [dict(GOOD)]}
    if field in ("a", "b", "v"):
        obj[field] = value
    else:
        obj["b"][0][field] = value  # type: ignore[index]
    try:
        result = decode_record(json.dumps(obj).encode())
    except RecordError:
        return
    assert encode_record(result, max_bytes=2**20)  # whatever decodes, re-encodes


# -- keys and identity -----------------------------------------------------------------


@given(text)
def test_dht_key_is_kademlias_digest(aor: str) -> None:
    assert dht_key(aor) == digest(aor)
    assert len(dht_key(aor)) == 20


def test_dht_key_of_the_example_aor() -> None:
    assert dht_key(ALICE) == digest(ALICE)
    with pytest.raises(RecordError):
        dht_key("sip:\ud800@x")


def test_identity() -> None:
    plain = binding()
    assert plain.identity == (ALICE, KEY_A, "sip:alice@192.0.2.4")
    flow = binding(instance="<urn:uuid:1>", reg_id=2)
    assert flow.identity == (ALICE, KEY_A, "<urn:uuid:1>\x002")
    # RFC 5626: the flow, not the contact, names the binding.
    assert binding("sip:other@x", instance="<urn:uuid:1>", reg_id=2).identity == flow.identity
    assert binding(instance="<urn:uuid:1>", reg_id=3).identity != flow.identity
    assert binding(key_id=KEY_B).identity != plain.identity


def test_signing_bytes_are_domain_separated_and_exclude_the_signature() -> None:
    b = binding()
    assert b.signing_bytes().startswith(b"p2psip-binding-v1\x00")
    assert b.signing_bytes() == binding(signature=b"other").signing_bytes()
    assert b.signing_bytes() == binding(expires_at=4600).signing_bytes()
    for field in dataclasses.fields(DhtBinding):
        if field.name != "signature":
            changed: Any = {
                "aor": "sip:bob@example.com",
                "contact": "sip:x@y",
                "home": "sip:h",
                "expires_at": 4601.0,
                "site": "oslo",
                "version": 2,
                "key_id": KEY_B,
                "q": 0.5,
                "instance": "<urn:uuid:1>",
                "reg_id": 1,
                "tombstone": True,
            }[field.name]
            assert binding(**{field.name: changed}).signing_bytes() != b.signing_bytes()


# -- expiry arithmetic -----------------------------------------------------------------


def test_expiry_with_a_manual_clock() -> None:
    now = 1000.0
    b = new_binding(
        aor=ALICE, contact="sip:a@x", home="sip:h", site="paris", version=1, now=now, expires=3600
    )
    assert b.expires_at == 4600
    assert b.expires_in(now) == 3600
    assert b.expires_in(4599.4) == 1
    assert b.is_live(4599.999) and not b.is_expired(4599.999)
    assert b.expires_in(4600) == 0 and not b.is_live(4600) and b.is_expired(4600)
    assert b.expires_in(9999) == 0


def test_expiry_is_absolute_through_the_wire_and_merges() -> None:
    """A record read later, merged and re-written many times keeps its absolute expiry."""
    b = new_binding(
        aor=ALICE, contact="sip:a@x", home="sip:h", site="paris", version=1, now=1000, expires=3600
    )
    record = encode_record([b])
    for now in (1000.0, 2000.0, 3000.0, 4000.0):
        (b,) = merge(decode_record(record), now=now)
        record = encode_record([b])
    assert b.expires_at == 4600 and b.expires_in(4000) == 600
    assert merge(decode_record(record), now=4600) == ()


@pytest.mark.parametrize("expires", [1_700_000_000, MAX_LIFETIME + 1, 0, -5, math.nan, True])
def test_a_lifetime_cannot_be_absolute_or_absurd(expires: float) -> None:
    # 39peers added `now` to a time that already included it: registrations for 57 years.
    with pytest.raises(RecordError):
        new_binding(
            aor=ALICE, contact="c", home="h", site="s", version=1, now=1.7e9, expires=expires
        )


def test_merge_drops_bindings_that_claim_to_live_for_decades() -> None:
    now = 1_700_000_000.0
    doubled = binding(expires_at=now + now)  # the 57-year registration
    sane = binding("sip:b@x", expires_at=now + 3600)
    assert merge([doubled, sane], now=now) == (sane,)
    assert live([doubled], now) == ()
    assert merge([binding(expires_at=now + MAX_LIFETIME)], now=now)  # at the edge: kept


def test_expires_in_never_raises() -> None:
    assert binding(expires_at=math.inf).expires_in(0) == MAX_EXPIRES_IN
    assert binding(expires_at=math.nan).expires_in(0) == 0
    assert binding(expires_at=math.nan).is_expired(0)


def test_tombstone_expiry() -> None:
    t = tombstone_of(binding(), version=2)
    assert t.tombstone and t.version == 2 and t.expires_at == 4600 and t.signature == b""
    assert not t.is_live(1000) and not t.is_expired(1000) and t.is_expired(4600)
    assert t.identity == binding().identity
    assert tombstone_of(binding(), version=2, expires_at=9000).expires_at == 9000
    with pytest.raises(RecordError):
        tombstone_of(binding(version=5), version=5)


# -- merge -----------------------------------------------------------------------------


def test_two_sites_bindings_for_one_aor_both_survive() -> None:
    paris = binding(site="paris", key_id=KEY_A)
    oslo = binding(site="oslo", key_id=KEY_B, home="sip:198.51.100.1")  # same contact, even
    assert set(merge([paris], [oslo], now=1000)) == {paris, oslo}
    assert live([paris, oslo], 1000) == merge([oslo, paris], now=1000)


def test_higher_version_wins_in_any_order() -> None:
    old, new = binding(version=1), binding(version=2, home="sip:moved")
    assert merge([old], [new], now=1000) == merge([new], [old], now=1000) == (new,)
    assert merge([old, new, old], now=1000) == (new,)


def test_identical_duplicates_collapse_and_ties_are_deterministic() -> None:
    assert merge([binding()], [binding()], now=1000) == (binding(),)
    low, high = binding(signature=b"a" * 64), binding(signature=b"b" * 64)
    assert merge([low], [high], now=1000) == merge([high], [low], now=1000) == (high,)


def test_tombstone_hides_exactly_the_binding_it_names() -> None:
    phone, desk = binding("sip:alice@phone"), binding("sip:alice@desk")
    gone = tombstone_of(phone, version=2)
    merged = merge([phone, desk], [gone], now=1000)
    assert set(merged) == {gone, desk}  # the tombstone travels on, hiding the binding
    assert live(merged, 1000) == (desk,)
    assert live([phone, desk, gone], 1000) == (desk,)  # live() merges first
    assert merge([gone], [dataclasses.replace(phone, version=3)], now=1000)[0].version == 3


def test_tombstone_lapses_at_its_own_expiry() -> None:
    phone = binding(expires_at=4600.0)
    gone = tombstone_of(phone, version=2)  # lapses when the binding would have
    assert merge([phone, gone], now=4599) == (gone,)
    assert merge([phone, gone], now=4600) == ()
    # A tombstone that lapses early stops hiding: which is why tombstone_of defaults to
    # the binding's own expiry.
    early = tombstone_of(phone, version=2, expires_at=3000.0)
    assert merge([phone, early], now=2999) == (early,)
    assert merge([phone, early], now=3000) == (phone,)


def test_another_signer_cannot_override_or_tombstone_a_binding() -> None:
    mine = binding(key_id=KEY_A)
    theirs = dataclasses.replace(mine, key_id=KEY_B, version=99, home="sip:evil")
    forged_tombstone = tombstone_of(theirs, version=100)
    merged = merge([mine], [theirs, forged_tombstone], now=1000)
    assert mine in merged
    assert live(merged, 1000) == (mine,)


def test_expired_bindings_and_tombstones_are_dropped() -> None:
    fresh, stale = binding("sip:a@x", expires_at=2000.0), binding("sip:b@x", expires_at=999.0)
    dead_tombstone = tombstone_of(binding("sip:c@x"), version=2, expires_at=1000.0)
    assert merge([fresh, stale, dead_tombstone], now=1000) == (fresh,)


def test_merge_result_is_sorted_by_identity() -> None:
    bs = [binding(f"sip:{c}@x") for c in "dbca"]
    assert [b.contact for b in merge(bs, now=0)] == [f"sip:{c}@x" for c in "abcd"]


# Small pools so that identities, versions and expiries collide often.
pool = st.builds(
    binding,
    contact=st.sampled_from(["sip:a@x", "sip:b@x"]),
    key_id=st.sampled_from([KEY_A, KEY_B]),
    version=st.integers(0, 3),
    expires_at=st.sampled_from([500.0, 1000.0, 1500.0, 2000.0]),
    tombstone=st.booleans(),
    signature=st.sampled_from([b"", b"a", b"b"]),
    instance=st.sampled_from([None, "<urn:uuid:1>"]),
    reg_id=st.sampled_from([None, 1]),
    q=st.sampled_from([0.0, 0.5, 1.0]),
)
sets = st.lists(pool, max_size=6)
nows = st.sampled_from([0.0, 1000.0, 1500.0])


@settings(max_examples=500, deadline=None)
@given(sets, sets, sets, nows)
def test_merge_is_a_join(a: list[DhtBinding], b: list[DhtBinding], c: list[DhtBinding],
                         now: float) -> None:  # fmt: skip
    ab = merge(a, b, now=now)
    assert ab == merge(b, a, now=now)  # commutative
    assert merge(ab, c, now=now) == merge(a, merge(b, c, now=now), now=now)  # associative
    assert merge(a, a, now=now) == merge(a, now=now) == merge(merge(a, now=now), now=now)
    assert merge(a, b, c, now=now) == merge(ab, c, now=now)
    # one binding per identity, none expired, each the best seen
    assert len({x.identity for x in ab}) == len(ab)
    assert all(not x.is_expired(now) for x in ab)
    for x in [*a, *b]:
        if not x.is_expired(now):
            (kept,) = [y for y in ab if y.identity == x.identity]
            assert kept.version >= x.version

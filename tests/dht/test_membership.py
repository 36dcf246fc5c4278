"""dht_adaptor.membership: sealing and opening datagrams, pure functions with a given clock."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dht_adaptor.keys import SiteKey, TrustStore
from dht_adaptor.membership import (
    OVERHEAD,
    WINDOW,
    Member,
    NotAMember,
    Refusal,
    RefusalLog,
    node_id_of,
    open_datagram,
)

PARIS, TOKYO, STRANGER = SiteKey.generate(), SiteKey.generate(), SiteKey.generate()
TRUST = TrustStore({k.key_id: k.public_bytes for k in (PARIS, TOKYO)})
NOW = 1_700_000_000.0
PING = b"\x00" + b"m" * 20 + b"\x92\xa4ping\x91\xc4\x14" + b"i" * 20  # an rpcudp request


def refusal(data: bytes, trust: TrustStore = TRUST, now: float = NOW) -> Refusal:
    with pytest.raises(NotAMember) as caught:
        open_datagram(data, trust, now)
    return caught.value.reason


def test_a_sealed_datagram_opens_to_its_sender_and_bytes() -> None:
    member = Member(PARIS, b"salt0001")
    sealed = member.seal(PING, NOW)
    assert len(sealed) == len(PING) + OVERHEAD == len(PING) + 90
    sender = open_datagram(sealed, TRUST, NOW)
    assert sender.key_id == PARIS.key_id
    assert sender.node_id == member.node_id == node_id_of(PARIS.public_bytes, b"salt0001")
    assert sender.datagram == PING
    assert open_datagram(member.seal(b"", NOW), TRUST, NOW).datagram == b""


def test_node_ids_are_bound_to_key_and_salt() -> None:
    ids = {Member(key, salt).node_id for key in (PARIS, TOKYO) for salt in (b"a" * 8, b"b" * 8)}
    assert len(ids) == 4 and all(len(i) == 20 for i in ids)
    assert Member(PARIS, b"a" * 8).node_id == Member(PARIS, b"a" * 8).node_id  # restarts
    with pytest.raises(ValueError, match="8 bytes"):
        Member(PARIS, b"short")


def test_plain_rpcudp_datagrams_and_junk_carry_no_proof() -> None:
    assert refusal(PING) is Refusal.NO_PROOF  # what a plain kademlia node sends
    assert refusal(b"") is Refusal.NO_PROOF
    assert refusal(b"P1" + bytes(OVERHEAD - 3)) is Refusal.NO_PROOF  # one byte short
    assert refusal(b"P2" + Member(PARIS, b"salt0001").seal(PING, NOW)[2:]) is Refusal.NO_PROOF


def test_untrusted_and_removed_keys_are_refused() -> None:
    sealed = Member(STRANGER, b"salt0001").seal(PING, NOW)
    with pytest.raises(NotAMember) as caught:
        open_datagram(sealed, TRUST, NOW)
    assert caught.value.reason is Refusal.UNTRUSTED_KEY
    assert caught.value.key_id == STRANGER.key_id  # named in the log line
    # The key is looked up at every datagram: a trust store without it refuses it.
    tokyo = Member(TOKYO, b"salt0001").seal(PING, NOW)
    assert open_datagram(tokyo, TRUST, NOW).key_id == TOKYO.key_id
    assert refusal(tokyo, TrustStore({PARIS.key_id: PARIS.public_bytes})) is Refusal.UNTRUSTED_KEY


@pytest.mark.parametrize("skew", [-WINDOW - 1, WINDOW + 1, -1e9, 1e9])
def test_timestamps_outside_the_window_are_refused(skew: float) -> None:
    sealed = Member(PARIS, b"salt0001").seal(PING, NOW + skew)
    assert refusal(sealed) is Refusal.STALE


@pytest.mark.parametrize("skew", [-WINDOW + 1, 0.0, WINDOW - 1])
def test_timestamps_inside_the_window_are_accepted(skew: float) -> None:
    assert open_datagram(Member(PARIS, b"salt0001").seal(PING, NOW + skew), TRUST, NOW)


def test_sealing_needs_a_wall_clock_time() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="wall-clock"):
            Member(PARIS, b"salt0001").seal(PING, bad)


def test_signatures_are_domain_separated() -> None:
    # A signature by the site key over the same bytes without the DHT domain (a binding
    # signature, a relay proof) does not make a datagram.
    sealed = Member(PARIS, b"salt0001").seal(PING, NOW)
    header, body = sealed[:26], sealed[OVERHEAD:]
    resigned = header + PARIS.sign(header + body) + body
    assert refusal(resigned) is Refusal.BAD_SIGNATURE


SEALED = Member(PARIS, b"salt0001").seal(PING, NOW)


@given(st.integers(0, len(SEALED) - 1), st.integers(1, 255))
@example(OVERHEAD - 1, 1)  # the last bit of the signature
@example(0, 1)  # the tag
def test_any_change_to_a_sealed_datagram_is_refused(at: int, flip: int) -> None:
    changed = bytearray(SEALED)
    changed[at] ^= flip
    assert refusal(bytes(changed)) in set(Refusal)


FRESH_HEADER = (
    b"P1" + bytes.fromhex(PARIS.key_id) + b"salt0001" + int(NOW * 1000).to_bytes(8, "big")
)


@given(st.binary(max_size=300), st.binary(min_size=64, max_size=64), st.binary(max_size=100))
def test_arbitrary_bytes_are_refused_never_raise(
    junk: bytes, signature: bytes, body: bytes
) -> None:
    # Whatever arrives: NotAMember, nothing else. With a trusted key id and a fresh
    # timestamp in front, the signature is what refuses it.
    assert refusal(junk) in set(Refusal)
    assert refusal(FRESH_HEADER + signature + body) is Refusal.BAD_SIGNATURE


def test_refusals_are_logged_once_per_interval() -> None:
    log = RefusalLog(interval=60.0)
    assert log.flush(0.0) is None  # nothing to say
    first = log.note(100.0, "no proof from 127.0.0.1:9")
    assert first == "refused 1 DHT datagram(s) (last: no proof from 127.0.0.1:9)"
    assert [log.note(100.0 + i, "bad signature 0123 from 127.0.0.1:9") for i in range(59)] == [
        None
    ] * 59
    assert log.flush(159.0) is None  # the interval is not over
    assert log.flush(160.0) == (
        "refused 59 DHT datagram(s) in the last 60 s (last: bad signature 0123 from 127.0.0.1:9)"
    )
    assert log.flush(500.0) is None  # nothing since
    assert log.note(501.0, "stale 0123 from 127.0.0.1:9") is not None

"""The STUN keep-alive codec (proxy.stun): RFC 5769's test vectors, the answers a
keep-alive gets, and the contract "decode it, or raise StunError"."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import stun


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


TID = unhex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
# RFC 5769 §2.1: a Binding request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
# MESSAGE-INTEGRITY and FINGERPRINT (the padding is spaces, which §15 allows).
RFC5769_REQUEST = unhex("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86
    fa 87 df ae 80 22 00 10 53 54 55 4e 20 74 65 73
    74 20 63 6c 69 65 6e 74 00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36 00 06 00 09
    65 76 74 6a 3a 68 36 76 59 20 20 20 00 08 00 14
    9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49
    c1 b5 71 a2 80 28 00 04 e5 7a 3b cf""")
# RFC 5769 §2.2 and §2.3: the responses, mapped address 192.0.2.1:32853 and over IPv6.
RFC5769_IPV4_RESPONSE = unhex("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86
    fa 87 df ae 80 22 00 0b 74 65 73 74 20 76 65 63
    74 6f 72 20 00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9
    2a f9 ba 53 f0 6b e7 d7 80 28 00 04 c0 7d 4c 96""")
RFC5769_IPV6_RESPONSE = unhex("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86
    fa 87 df ae 80 22 00 0b 74 65 73 74 20 76 65 63
    74 6f 72 20 00 20 00 14 00 02 a1 47 01 13 a9 fa
    a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9 00 08 00 14
    a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75
    bf e3 ed 41 80 28 00 04 c8 fb 0b 4c""")


# --- RFC 5769 vectors -----------------------------------------------------------------------


def test_the_rfc5769_request_decodes_with_its_fingerprint() -> None:
    msg = stun.decode(RFC5769_REQUEST)
    assert msg.type == stun.BINDING_REQUEST
    assert msg.transaction_id == TID
    assert [k for k, _ in msg.attributes] == [0x8022, 0x0024, 0x8029, 0x0006, 0x0008, 0x8028]
    assert msg.attribute(0x8022) == b"STUN test client"
    assert msg.attribute(0x0006) == b"evtj:h6vY"  # the value, without its padding


@pytest.mark.parametrize(
    ("response", "address"),
    [
        (RFC5769_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (RFC5769_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_the_rfc5769_responses_give_their_mapped_address(
    response: bytes, address: tuple[str, int]
) -> None:
    msg = stun.decode(response)
    assert msg.type == stun.BINDING_SUCCESS
    assert stun.mapped_address(msg) == address
    # Our encoder writes the same XOR-MAPPED-ADDRESS value, byte for byte.
    assert stun.xor_address(*address, TID) == msg.attribute(0x0020)


def test_a_broken_fingerprint_is_refused() -> None:
    broken = RFC5769_REQUEST[:-1] + bytes([RFC5769_REQUEST[-1] ^ 1])
    with pytest.raises(stun.StunError, match="FINGERPRINT"):
        stun.decode(broken)


# --- answers ----------------------------------------------------------------------------------


def test_a_keepalive_binding_request_gets_the_address_it_came_from() -> None:
    reply = stun.answer(stun.binding_request(TID), "203.0.113.7", 40000)
    assert reply is not None
    msg = stun.decode(reply)
    assert msg.type == stun.BINDING_SUCCESS
    assert msg.transaction_id == TID
    assert stun.mapped_address(msg) == ("203.0.113.7", 40000)
    assert len(reply) == 32  # header and XOR-MAPPED-ADDRESS: an answer costs little


def test_an_ipv6_source_is_answered_with_an_ipv6_address() -> None:
    reply = stun.answer(stun.binding_request(TID), "2001:db8::5", 5060)
    assert reply is not None
    assert stun.mapped_address(stun.decode(reply)) == ("2001:db8::5", 5060)


def test_a_request_with_a_fingerprint_gets_one_back() -> None:
    reply = stun.answer(stun.binding_request(TID, fingerprint=True), "192.0.2.1", 5060)
    assert reply is not None
    msg = stun.decode(reply)  # the fingerprint is checked on decode
    assert msg.attributes[-1][0] == 0x8028


def test_unknown_comprehension_required_attributes_get_420() -> None:
    # USERNAME and MESSAGE-INTEGRITY: we hold no STUN credentials.
    reply = stun.answer(RFC5769_REQUEST, "192.0.2.1", 5060)
    assert reply is not None
    msg = stun.decode(reply)
    assert msg.type == 0x0111
    code = msg.attribute(0x0009)
    assert code is not None and (code[2], code[3]) == (4, 20)
    assert msg.attribute(0x000A) == bytes.fromhex("0024 0006 0008")


@pytest.mark.parametrize(
    "message",
    [
        stun.encode(stun.StunMessage(0x0011, TID)),  # Binding indication: a keep-alive
        RFC5769_IPV4_RESPONSE,  # a response is never answered
        stun.encode(stun.StunMessage(0x0003, TID)),  # Allocate (TURN): not ours
    ],
)
def test_only_binding_requests_are_answered(message: bytes) -> None:
    assert stun.answer(message, "192.0.2.1", 5060) is None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (stun.binding_request(TID)[:19], "not a STUN"),
        (b"\x00\x01\x00\x00\x21\x12\xa4\x43" + TID, "not a STUN"),  # cookie off by one
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + TID, "length"),  # says 4, has 0
        (b"\x00\x01\x00\x02\x21\x12\xa4\x42" + TID + b"\0\0", "length"),  # not a multiple of 4
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + TID + b"\x80\x22\x00\x08", "past"),
        (b"\x00\x01" + (600).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + TID + bytes(600), "long"),
    ],
)
def test_malformed_messages_raise_stun_error(data: bytes, why: str) -> None:
    with pytest.raises(stun.StunError, match=why):
        stun.decode(data)


def test_sip_is_not_stun() -> None:
    assert not stun.looks_like_stun(b"OPTIONS sip:example.com SIP/2.0\r\n\r\n")
    assert not stun.looks_like_stun(b"\r\n\r\n")


@given(st.binary(max_size=80))
def test_arbitrary_bytes_decode_or_raise_stun_error(data: bytes) -> None:
    with contextlib.suppress(stun.StunError):
        stun.decode(data)


@given(st.binary(max_size=60))
def test_arbitrary_bytes_after_a_valid_header_decode_or_raise_stun_error(tail: bytes) -> None:
    data = b"\x00\x01" + len(tail).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + TID + tail
    try:
        reply = stun.answer(data, "192.0.2.1", 5060)
    except stun.StunError:
        return
    assert reply is None or stun.decode(reply).transaction_id == TID


@given(
    st.lists(st.tuples(st.integers(0x8000, 0x8027), st.binary(max_size=12)), max_size=4).map(tuple)
)
def test_encode_then_decode_is_the_identity(attributes: tuple[tuple[int, bytes], ...]) -> None:
    msg = stun.StunMessage(stun.BINDING_REQUEST, TID, attributes)
    assert stun.decode(stun.encode(msg)) == msg

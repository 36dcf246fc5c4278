"""Fuzzing the parser: any bytes either parse to a Request or Response, or raise ParseError.

Anything else (an IndexError, a ValueError from int(), a UnicodeError...) is a bug: the
transport answers ParseError with its status and would crash on the rest. The same
contract holds for ``validate_request`` / ``validate_response`` on whatever parses.

Inputs are (a) arbitrary bytes, (b) a start line followed by random header lines, and
(c) valid messages (the RFC 4475 well-formed ones and a few of our own) damaged by byte
flips, truncations, insertions, and duplicated or deleted lines. Every example is tried
as a datagram and as a stream frame.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.errors import ParseError
from proxy.sip.message import (
    Request,
    Response,
    StartLineError,
    parse_message,
    validate_request,
    validate_response,
)
from tests.sip import corpus

_OWN = [
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"v: SIP/2.0/TCP [2001:db8::9]:5070;branch=z9hG4bKr1;rport,\r\n"
    b" SIP/2.0/UDP h;received=192.0.2.1\r\n"
    b"Max-Forwards: 0070\r\n"
    b't: "Bob \\"B\\"" <sip:bob@example.com>\r\n'
    b"f: Bob <sip:bob@example.com>;tag=x\r\n"
    b"i: r1@example.com\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b'm: <sip:bob@192.0.2.4:5062;transport=tcp>;expires=60;q=0.5, "x" <sip:b@h>\r\n'
    b"Expires: 3600\r\n"
    b'Authorization: Digest username="bob", realm="example.com", nonce="n",\r\n'
    b' uri="sip:example.com", response="0123"\r\n'
    b"l: 0\r\n\r\n",
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKc\r\n"
    b"Record-Route: <sip:proxy.example.com;lr>\r\n"
    b"To: <sip:bob@example.com>;tag=b1\r\n"
    b"From: <sip:alice@example.com>;tag=a1\r\n"
    b"Call-ID: c1@192.0.2.10\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:bob@192.0.2.20>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 13\r\n\r\n"
    b"v=0\r\no=- 1 1\r\n",
    b"MESSAGE tel:+14085551234;phone-context=example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10\r\n"
    b"Max-Forwards: 1\r\n"
    b"To: tel:+14085551234\r\n"
    b"From: sip:alice@example.com;tag=a1\r\n"
    b"Call-ID: m1\r\n"
    b"CSeq: 9 MESSAGE\r\n"
    b"Route: <sip:edge.example.com;lr>\r\n"
    b"Content-Length: 2\r\n\r\n"
    b"hi",
]
SEEDS = [corpus.load(name) for name in corpus.VALID] + _OWN

# Bytes that mean something to the grammar, and Unicode that case-maps or counts as a
# digit: "\u017f".upper() == "S" and "\u0131".upper() == "I"; "\u00b2" and "\u0663"
# pass str.isdigit().
_FRAGMENTS = [
    *(bytes([c]) for c in b';,<>"\\:@%[]=?&/ \t\r\n0'),
    b"\r\n ", b"\r\n\r\n", b"%0", b"%zz", b"[::1]", b"[", b"9" * 12, b"-1",
    b"\x00", b"\x7f", b"\xff", b"\xc3", b"\xc3\xa9",
    "\u017f".encode(), "\u0131".encode(), "\u00b2".encode(), "\u0663".encode(),
    b"SIP/2.0", b"sip:", b"tel:", b";tag=", b";branch=z9hG4bK", b";maddr=", b"<sip:",
    b"Content-Length: 99999\r\n", b"Via: \r\n", b"To: ,\r\n",
]  # fmt: skip


def check(data: bytes) -> None:
    """The contract: parse and validate, or raise ParseError; nothing else."""
    for stream in (False, True):
        try:
            msg = parse_message(data, stream=stream)
        except ParseError:
            continue
        assert isinstance(msg, Request | Response)
        assert _version_is_ascii(data, msg)
        try:
            if isinstance(msg, Request):
                validate_request(msg)
            else:
                validate_response(msg)
        except ParseError:
            pass


def _version_is_ascii(data: bytes, msg: Request | Response) -> bool:
    """RFC 3261 §25: SIP-Version is the literal "SIP/2.0" (ASCII, any case)."""
    start_line = data.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    if isinstance(msg, Response):
        return start_line[:8].lower() == b"sip/2.0 "
    return start_line[-8:].lower() == b" sip/2.0"


# --- (a) arbitrary bytes -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.sampled_from([b"INVITE sip:bob@example.com SIP/2.0", b"SIP/2.0 180 Ringing", b""]),
    st.lists(st.tuples(st.sampled_from(["Via", "To", "f", "CSeq", "Call-ID", "X-Y"]), st.text())),
    st.binary(max_size=20),
)
def test_random_header_lines(start: bytes, lines: list[tuple[str, str]], body: bytes) -> None:
    head = b"".join(
        f"{name}: {value}\r\n".encode("utf-8", "surrogatepass") for name, value in lines
    )
    check(start + b"\r\n" + head + b"\r\n" + body)


# --- (b) damaged valid messages ---------------------------------------------------------------


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        ops = ["flip", "set", "replace", "truncate", "insert", "delete", "dup", "drop"]
        op = draw(st.sampled_from(ops))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op in ("insert", "replace"):
            fragment = draw(st.sampled_from(_FRAGMENTS) | st.binary(min_size=1, max_size=4))
            data[at : at if op == "insert" else at + 1] = fragment
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            lines = bytes(data).split(b"\r\n")
            i = at % len(lines)
            if op == "dup":
                lines.insert(i, lines[i])
            else:
                del lines[i]
            data = bytearray(b"\r\n".join(lines))
    return bytes(data)


@settings(max_examples=600, deadline=None, derandomize=True)
@given(damaged())
def test_damaged_valid_messages(data: bytes) -> None:
    check(data)


# Start lines are short, so a character swapped in one is worth trying more often.
_START_LINE_CHARS = [
    "\u017f", "\u0131", "\u212a", "\u00b2", "\u0663", "\u00e9", "\x00", "\x7f", "\u0085",
    " ", "\t", "\r", "\n", "/", ":", "<", "0", "9", "s", "S", "",
]  # fmt: skip


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(SEEDS), st.integers(0, 100), st.sampled_from(_START_LINE_CHARS))
def test_start_line_characters(seed: bytes, at: int, char: str) -> None:
    start_line, sep, rest = seed.partition(b"\r\n")
    text = start_line.decode()
    at %= len(text)
    check((text[:at] + char + text[at + 1 :]).encode() + sep + rest)


def test_the_seeds_parse_and_validate() -> None:
    for data in SEEDS:
        msg = parse_message(data)
        if isinstance(msg, Request):
            validate_request(msg)
        else:
            validate_response(msg)


# --- regressions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start_line",
    [
        "\u017fIP/2.0 200 OK",  # "\u017f".upper() == "S": was taken for a status line
        "INVITE sip:bob@example.com \u017fip/2.0",  # and for the version of a request
        "INVITE sip:bob@example.com S\u0131P/2.0",  # "\u0131".upper() == "I"
    ],
)
def test_the_version_is_ascii(start_line: str) -> None:
    rest = "Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\nCall-ID: c\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(StartLineError) as info:
        parse_message(f"{start_line}\r\n{rest}".encode())
    assert info.value.status_code == 400

"""Input limits of the parser (ParseLimits): each one a setting, each answered clearly.

Past a limit the parser raises a ParseError whose status and reason phrase say which limit
(513 Message Too Large, 400 Too Many Headers...). Once the start line and the header
fields were read it raises it as a StartLineError, so the request is answered rather than
dropped; the answer costs no more than the request (RFC 3261 §8.2.6.2 copies five fields).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxy.sip.errors import (
    HeaderLineTooLong,
    InputLimitExceeded,
    MessageTooLarge,
    ParseError,
    RequestUriTooLong,
    TooManyHeaders,
    TooManyRoutes,
    TooManyVias,
)
from proxy.sip.framing import Frame, StreamFramer
from proxy.sip.message import (
    DEFAULT_LIMITS,
    LimitStartLineError,
    ParseLimits,
    Request,
    StartLineError,
    TooLargeStartLineError,
    error_response,
    parse_message,
    validate_request,
)

from .corpus import VALID, load

VIA = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKlim"


def request(extra: str = "", *, uri: str = "sip:bob@example.com", body: bytes = b"") -> bytes:
    """A valid INVITE with eight header fields (Content-Length included) plus ``extra``."""
    return (
        f"INVITE {uri} SIP/2.0\r\n"
        f"Via: {VIA}\r\n"
        "Max-Forwards: 70\r\n"
        "To: <sip:bob@example.com>\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        "Call-ID: limits-1\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:alice@192.0.2.10>\r\n"
        f"{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def refused(data: bytes, limits: ParseLimits) -> StartLineError:
    with pytest.raises(StartLineError) as info:
        parse_message(data, limits=limits)
    return info.value


def answer_line(exc: StartLineError) -> bytes:
    resp = error_response(exc.partial, exc)
    assert resp.headers.get("Call-ID") == "limits-1"
    assert resp.headers.get("Via") == VIA
    return resp.to_bytes().split(b"\r\n", 1)[0]


# --- the settings ----------------------------------------------------------------------------


def test_defaults() -> None:
    assert ParseLimits() == DEFAULT_LIMITS
    assert ParseLimits() == ParseLimits(
        max_message_bytes=65535, max_headers=128, max_header_line=8192, max_via=70, max_route=32
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"max_message_bytes": 0},
        {"max_message_bytes": 65536},
        {"max_headers": 0},
        {"max_header_line": -1},
        {"max_via": 0},
        {"max_route": 0},
    ],
)
def test_settings_out_of_range_are_refused(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ParseLimits(**kw)


def test_from_values_reads_the_settings_of_the_same_names() -> None:
    @dataclass(frozen=True)
    class Settings:  # stands for proxy.config.Config, whose fields have these names
        max_message_bytes: int = 4096
        max_headers: int = 20
        max_header_line: int = 1000
        max_via: int = 5
        max_route: int = 6
        unrelated: str = "x"

    assert ParseLimits.from_values(Settings()) == ParseLimits(4096, 20, 1000, 5, 6)


@pytest.mark.parametrize("name", VALID)
def test_every_valid_torture_message_fits_the_defaults(name: str) -> None:
    # RFC 4475 §3.1.1.7 longreq carries 34 Via values: the default must let it through.
    msg = parse_message(load(name), limits=DEFAULT_LIMITS)
    if isinstance(msg, Request):
        validate_request(msg)


def test_the_site_defaults_let_the_torture_messages_through() -> None:
    # What the server parses with: Config's settings of the same names (max_via 70).
    from proxy.config import Config

    limits = ParseLimits.from_values(Config())
    for name in VALID:
        parse_message(load(name), limits=limits)


# --- message size: 513 ----------------------------------------------------------------------


def test_a_datagram_over_the_size_limit_is_answered_513() -> None:
    limits = ParseLimits(max_message_bytes=1024)
    data = request(body=b"v" * 1200)
    exc = refused(data, limits)
    assert isinstance(exc, MessageTooLarge) and isinstance(exc, TooLargeStartLineError)
    assert exc.status_code == 513
    assert answer_line(exc) == b"SIP/2.0 513 Message Too Large"


def test_exactly_the_size_limit_parses() -> None:
    data = request(body=b"v" * 100)
    assert parse_message(data, limits=ParseLimits(max_message_bytes=len(data))).body == b"v" * 100


def test_a_header_block_past_the_size_limit_is_not_read() -> None:
    # Only the first max_message_bytes are searched for the end of the header block: past
    # that, nothing is parsed and nothing can be answered.
    limits = ParseLimits(max_message_bytes=1024)
    data = request("X-Pad: " + "p" * 1100 + "\r\n")
    with pytest.raises(MessageTooLarge) as info:
        parse_message(data, limits=limits)
    assert not isinstance(info.value, StartLineError)
    assert info.value.status_code == 513


def test_the_default_size_limit_is_64_kib() -> None:
    exc = refused(request(body=b"v" * 65535), DEFAULT_LIMITS)
    assert exc.status_code == 513


# --- header count and length: 400 with a reason phrase that says which ----------------------


def test_too_many_headers() -> None:
    limits = ParseLimits(max_headers=10)
    assert parse_message(request("A: 1\r\nB: 2\r\n"), limits=limits)  # exactly 10
    exc = refused(request("A: 1\r\nB: 2\r\nC: 3\r\n"), limits)
    assert isinstance(exc, LimitStartLineError) and isinstance(exc, InputLimitExceeded)
    assert type(exc.cause) is TooManyHeaders
    assert answer_line(exc) == b"SIP/2.0 400 Too Many Headers"


def test_a_header_line_too_long() -> None:
    limits = ParseLimits(max_header_line=300)
    ok = "Subject: " + "s" * (300 - len("Subject: ")) + "\r\n"
    assert parse_message(request(ok), limits=limits)
    exc = refused(request("Subject: " + "s" * 300 + "\r\n"), limits)
    assert type(exc.cause) is HeaderLineTooLong
    assert answer_line(exc) == b"SIP/2.0 400 Header Line Too Long"


def test_folding_does_not_hide_a_long_header_line() -> None:
    # RFC 3261 §7.3.1: continuation lines are one header field; its length is what counts.
    folded = "Subject: " + "\r\n ".join(["s" * 90] * 5) + "\r\n"
    exc = refused(request(folded), ParseLimits(max_header_line=300))
    assert type(exc.cause) is HeaderLineTooLong


def test_a_request_line_too_long_is_414() -> None:
    limits = ParseLimits(max_header_line=300)
    exc = refused(request(uri="sip:bob@example.com;x=" + "u" * 300), limits)
    assert type(exc.cause) is RequestUriTooLong
    assert answer_line(exc) == b"SIP/2.0 414 Request-URI Too Long"


# --- Via and Route: values are counted, not lines ------------------------------------------


def test_too_many_via_values() -> None:
    limits = ParseLimits(max_via=3)
    two_more = "Via: SIP/2.0/UDP a.example.com, SIP/2.0/UDP b.example.com\r\n"
    assert parse_message(request(two_more), limits=limits)  # 3 values on 2 lines
    exc = refused(request(two_more + "v: SIP/2.0/TCP c.example.com\r\n"), limits)
    assert type(exc.cause) is TooManyVias
    assert answer_line(exc) == b"SIP/2.0 400 Too Many Via Headers"
    # One line of four values counts four.
    exc = refused(request("Via: " + ", ".join(["SIP/2.0/UDP x.example.com"] * 3) + "\r\n"), limits)
    assert type(exc.cause) is TooManyVias


def test_too_many_route_values() -> None:
    limits = ParseLimits(max_route=2)
    # A comma inside a quoted display name or <> does not separate values.
    two = 'Route: "a, b" <sip:p1.example.com;lr>, <sip:p2.example.com;lr;x=",">\r\n'
    assert parse_message(request(two), limits=limits)
    exc = refused(request(two + "Route: <sip:p3.example.com;lr>\r\n"), limits)
    assert type(exc.cause) is TooManyRoutes
    assert answer_line(exc) == b"SIP/2.0 400 Too Many Route Headers"


def test_a_response_over_a_limit_is_not_a_request() -> None:
    data = (
        "SIP/2.0 200 OK\r\n"
        + "".join(f"Via: SIP/2.0/UDP h{i}.example.com\r\n" for i in range(5))
        + "Content-Length: 0\r\n\r\n"
    ).encode()
    exc = refused(data, ParseLimits(max_via=4))
    assert type(exc.cause) is TooManyVias
    assert not exc.partial.is_request  # the server drops it: responses are never answered


def test_limit_errors_are_parse_errors() -> None:
    for cls in (TooManyHeaders, HeaderLineTooLong, TooManyVias, TooManyRoutes, RequestUriTooLong):
        assert issubclass(cls, InputLimitExceeded) and issubclass(cls, ParseError)


# --- the stream framer ------------------------------------------------------------------------


def test_the_framer_takes_its_size_limit_from_the_limits() -> None:
    limits = ParseLimits(max_message_bytes=1024)
    small, big = request(body=b"v" * 100), request(body=b"v" * 1100)
    assert StreamFramer(limits=limits).feed(small) == [Frame(small)]
    with pytest.raises(MessageTooLarge):
        StreamFramer(limits=limits).feed(big)
    # Nor can a header block without an end grow past the limit.
    endless = b"INVITE sip:b@example.com SIP/2.0\r\n" + b"X: y\r\n" * 200
    with pytest.raises(MessageTooLarge):
        StreamFramer(limits=limits).feed(endless)

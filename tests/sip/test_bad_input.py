"""Bad input gets an answer, not silence: what a phone sees for each kind of mistake.

A request whose start line or framing is wrong still has its header fields read
(``StartLineError.partial``), and the answer to it must be sendable: its status line and
the request's Via, From, To, Call-ID and CSeq (RFC 3261 §8.2.6.2), and a top Via the
server can read to know where the answer goes (§18.2.2).
"""

from __future__ import annotations

import pytest

from proxy.sip.errors import ParseError, VersionNotSupported
from proxy.sip.framing import Frame, StreamFramer
from proxy.sip.headers import parse_via
from proxy.sip.message import (
    Request,
    Response,
    StartLineError,
    error_response,
    parse_message,
    validate_request,
    validate_response,
)

CALLER_VIA = "SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bKbad1;rport"


def options(
    *,
    version: str = "SIP/2.0",
    via: str = CALLER_VIA,
    length: int | None = None,
    body: bytes = b"",
) -> bytes:
    cl = len(body) if length is None else length
    return (
        f"OPTIONS sip:proxy.example.com {version}\r\n"
        f"Via: {via}\r\n"
        "Max-Forwards: 70\r\n"
        "To: <sip:proxy.example.com>\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        "Call-ID: bad-input-1\r\n"
        "CSeq: 1 OPTIONS\r\n"
        f"Content-Length: {cl}\r\n\r\n"
    ).encode() + body


def answer(data: bytes) -> Response:
    """What the server sends back for a request it cannot parse (server._reject_unparsable)."""
    with pytest.raises(StartLineError) as info:
        parse_message(data)
    exc = info.value
    assert exc.partial.is_request
    resp = error_response(exc.partial, exc)
    # The server reads the top Via to know where the answer goes (RFC 3261 §18.2.2).
    probe = Request("X", "sip:x", exc.partial.headers)
    assert probe.top_via.sent_by() == ("192.0.2.10", 5062)
    return resp


# --- another SIP version: 505 (RFC 3261 §21.5.26, RFC 4475 §3.1.2.16) -----------------------


@pytest.mark.parametrize("via_version", ["SIP/2.0", "SIP/3.0", "SIP/7.0"])
def test_a_sip_3_request_is_answered_505(via_version: str) -> None:
    # A SIP/3.0 phone writes SIP/3.0 in its Via too (RFC 4475 badvers does, with 7.0).
    via = CALLER_VIA.replace("SIP/2.0", via_version)
    resp = answer(options(version="SIP/3.0", via=via))
    wire = resp.to_bytes()
    assert wire.startswith(b"SIP/2.0 505 Version Not Supported\r\n")
    # The Via is copied as the phone wrote it, so that the phone matches the answer.
    assert f"\r\nVia: {via}\r\n".encode() in wire
    assert b"\r\nCall-ID: bad-input-1\r\n" in wire


def test_the_505_keeps_the_version_error_class() -> None:
    with pytest.raises(VersionNotSupported) as info:
        parse_message(options(version="SIP/3.0", via=CALLER_VIA.replace("2.0", "3.0")))
    assert isinstance(info.value, StartLineError)
    assert info.value.status_code == 505


def test_a_foreign_via_version_reads_only_to_answer() -> None:
    # The sent-by of a SIP/3.0 Via is readable (to send the 505 there), but a SIP/2.0
    # message that carries one is still malformed: 400, as before.
    via = parse_via("SIP/3.0/UDP 192.0.2.10:5062;branch=z9hG4bKx")
    assert via.version == "3.0"
    assert via.sent_by() == ("192.0.2.10", 5062)
    assert str(via) == "SIP/3.0/UDP 192.0.2.10:5062;branch=z9hG4bKx"
    req = parse_message(options(via=str(via)))
    assert isinstance(req, Request)
    with pytest.raises(ParseError, match="Via protocol version") as info:
        validate_request(req)
    assert info.value.status_code == 400
    resp = parse_message(
        b"SIP/2.0 200 OK\r\nVia: SIP/3.0/UDP h;branch=z9hG4bKy\r\nTo: <sip:b@h>;tag=t\r\n"
        b"From: <sip:a@h>;tag=f\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(resp, Response)
    with pytest.raises(ParseError, match="Via protocol version"):
        validate_response(resp)


# --- Content-Length larger than what arrived -----------------------------------------------


def test_a_datagram_shorter_than_its_content_length_is_answered_400() -> None:
    # RFC 3261 §18.3: on UDP the datagram is the whole message; RFC 4475 §3.1.2.2 (clerr).
    resp = answer(options(length=500, body=b"v=0\r\n"))
    assert resp.to_bytes().startswith(b"SIP/2.0 400 ")
    assert resp.headers.get("Via") == CALLER_VIA


def test_on_a_stream_a_short_body_waits_for_the_rest() -> None:
    msg = options(body=b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\n")
    head, rest = msg[:-20], msg[-20:]  # the header block and part of the body
    framer = StreamFramer()
    assert framer.feed(head) == []
    assert framer.pending == len(head)
    assert framer.feed(rest) == [Frame(msg)]
    assert framer.pending == 0

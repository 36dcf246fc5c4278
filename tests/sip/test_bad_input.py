"""Bad input gets an answer, not silence: what a phone sees for each kind of mistake.

A request whose start line or framing is wrong still has its header fields read
(``StartLineError.partial``), and the answer to it must be sendable: its status line and
the request's Via, From, To, Call-ID and CSeq (RFC 3261 §8.2.6.2), and a top Via the
server can read to know where the answer goes (§18.2.2).
"""

from __future__ import annotations

import pytest

from proxy.sip.binding import Binding
from proxy.sip.errors import ParseError, VersionNotSupported
from proxy.sip.framing import Frame, StreamFramer
from proxy.sip.headers import parse_name_addr, parse_via
from proxy.sip.message import (
    Request,
    Response,
    StartLineError,
    error_response,
    parse_message,
    validate_request,
    validate_response,
)
from proxy.sip.registrar import RegisterOutcome, RegistrarConfig, process_register

from .corpus import load

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


# --- REGISTER expiry: delta-seconds or 400 (RFC 3261 §10.2.1.1, §20.19) ---------------------

NOW = 1000.0
REGISTRAR = RegistrarConfig(domains=("example.com",), max_expires=7200, default_expires=3600)
ALICE_PHONE = "<sip:alice@192.0.2.10:5062>"


def register(contact: str, expires: str | None = None, *, cseq: int = 1) -> Request:
    data = (
        "REGISTER sip:example.com SIP/2.0\r\n"
        f"Via: {CALLER_VIA}\r\n"
        "Max-Forwards: 70\r\n"
        "To: <sip:alice@example.com>\r\n"
        "From: <sip:alice@example.com>;tag=r1\r\n"
        "Call-ID: reg-bad-1\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: {contact}\r\n"
        + (f"Expires: {expires}\r\n" if expires is not None else "")
        + "Content-Length: 0\r\n\r\n"
    ).encode()
    req = parse_message(data)
    assert isinstance(req, Request)
    validate_request(req)  # the framing and fields are fine: only the registrar refuses
    return req


def registered(req: Request, current: tuple[Binding, ...] = ()) -> RegisterOutcome:
    return process_register(req, current, NOW, REGISTRAR, source="udp:192.0.2.10:5062", to_tag="t")


def granted(out: RegisterOutcome) -> int:
    """The seconds the 200 OK grants the phone's binding."""
    assert out.response.status == 200
    [contact] = out.response.headers.values("Contact")
    return int(parse_name_addr(contact).param("expires") or "-1")


@pytest.mark.parametrize("param", ["-1", "soon", "1.5", "+60", "0x10", '"3600"', "3600s"])
def test_a_contact_expires_that_is_not_delta_seconds_gets_400(param: str) -> None:
    out = registered(register(f"{ALICE_PHONE};expires={param}"))
    assert out.response.status == 400
    assert out.response.reason == "malformed Contact expires parameter"
    assert not out.changed  # nothing stored: not 3600 s, not the default


def test_a_valueless_contact_expires_gets_400() -> None:
    out = registered(register(f"{ALICE_PHONE};expires"))
    assert (out.response.status, out.changed) == (400, False)


@pytest.mark.parametrize("param", ["", "\u0663\u0660"])
def test_an_expires_param_that_is_not_even_a_token_is_refused_by_validation(param: str) -> None:
    # "expires=" and non-ASCII digits break the Contact grammar: validate_request's 400.
    with pytest.raises(ParseError) as info:
        register(f"{ALICE_PHONE};expires={param}")
    assert info.value.status_code == 400


@pytest.mark.parametrize("header", ["-1", "soon", "", "Thu, 01 Dec 2094 16:00:00 GMT"])
def test_an_expires_header_that_is_not_delta_seconds_gets_400(header: str) -> None:
    out = registered(register(ALICE_PHONE, header))
    assert out.response.status == 400
    assert out.response.reason == "malformed Expires header"
    assert not out.changed


def test_a_bad_expires_header_is_refused_even_when_every_contact_has_its_own() -> None:
    out = registered(register(f"{ALICE_PHONE};expires=60", "-1"))
    assert out.response.status == 400


def test_a_query_with_a_bad_expires_header_gets_400() -> None:
    req = register(ALICE_PHONE, "-1")
    req.headers.remove("Contact")
    assert registered(req).response.status == 400


@pytest.mark.parametrize(
    ("contact", "header"),
    [
        (f"{ALICE_PHONE};expires=99999999999999999999", None),
        (ALICE_PHONE, "99999999999999999999"),
        (f"{ALICE_PHONE};expires=4294967296", None),  # 2**32: past delta-seconds' range
        (f"{ALICE_PHONE};expires=86400", None),
    ],
)
def test_huge_expiry_values_are_capped_at_max_expires(contact: str, header: str | None) -> None:
    # RFC 3261 §10.2.1.1: values past 2**32-1 MAY be taken as 2**32-1; §10.3 step 7: the
    # registrar MAY shorten the interval. RFC 4475 §3.1.2.4 (scalar02): overlarge expiry
    # values alone do not make a request bad.
    assert granted(registered(register(contact, header))) == 7200


def test_the_torture_test_with_overlarge_expiry_values_is_still_400_for_its_cseq() -> None:
    # RFC 4475 §3.1.2.4: its CSeq is past 2**31-1; that (not the expiry) gets the 400.
    msg = parse_message(load("scalar02"))
    assert isinstance(msg, Request)
    with pytest.raises(ParseError, match="CSeq"):
        validate_request(msg)

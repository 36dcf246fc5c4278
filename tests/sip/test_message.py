"""Parsing, serializing, validating and answering whole SIP messages."""

from __future__ import annotations

import pytest

from proxy.sip.errors import MessageTooLarge, ParseError, VersionNotSupported
from proxy.sip.headers import CSeq, Headers, Via
from proxy.sip.message import (
    MAX_MESSAGE_SIZE,
    PartialMessage,
    Request,
    Response,
    StartLineError,
    make_response,
    parse_message,
    validate_request,
    validate_response,
)
from proxy.sip.uri import SipUri

INVITE_HEAD = (
    "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8\r\n"
    "Max-Forwards: 70\r\n"
    "To: Bob <sip:bob@biloxi.example.com>\r\n"
    "From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    "Call-ID: a84b4c76e66710\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
)


def invite(extra: str = "", body: bytes = b"", length: int | None = None) -> bytes:
    cl = len(body) if length is None else length
    return (INVITE_HEAD + extra + f"Content-Length: {cl}\r\n\r\n").encode() + body


def parse_request(data: bytes, **kw: bool) -> Request:
    msg = parse_message(data, **kw)
    assert isinstance(msg, Request)
    return msg


def parse_response(data: bytes) -> Response:
    msg = parse_message(data)
    assert isinstance(msg, Response)
    return msg


# --- parsing ---------------------------------------------------------------------------


def test_parse_request() -> None:
    req = parse_request(invite(body=b"v=0\r\n"))
    validate_request(req)
    assert req.method == "INVITE"
    assert req.uri == "sip:bob@biloxi.example.com"
    assert req.ruri == SipUri("sip", "bob", "biloxi.example.com")
    assert req.top_via.branch == "z9hG4bKnashds8"
    assert req.max_forwards == 70
    assert req.to.display == "Bob"
    assert req.from_.tag == "1928301774"
    assert req.call_id == "a84b4c76e66710"
    assert req.cseq == CSeq(314159, "INVITE")
    assert req.contacts == ["<sip:alice@pc33.atlanta.example.com>"]
    assert req.body == b"v=0\r\n"
    assert repr(req) == "<Request INVITE sip:bob@biloxi.example.com>"


def test_parse_response() -> None:
    data = (
        b"SIP/2.0 180 Ringing\r\n"
        b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8\r\n"
        b"To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n"
        b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
        b"Call-ID: a84b4c76e66710\r\n"
        b"CSeq: 314159 INVITE\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    resp = parse_response(data)
    validate_response(resp)
    assert (resp.status, resp.reason) == (180, "Ringing")
    assert resp.to.tag == "a6c85cf"
    assert repr(resp) == "<Response 180 Ringing>"
    assert resp.to_bytes() == data


def test_compact_names_are_expanded() -> None:
    data = (
        b"OPTIONS sip:a@b.example.com SIP/2.0\r\n"
        b"v: SIP/2.0/UDP h.example.com;branch=z9hG4bK1\r\n"
        b"t: <sip:a@b.example.com>\r\nf: <sip:c@d.example.com>;tag=1\r\n"
        b"i: abc\r\nCSeq: 1 OPTIONS\r\nm: <sip:c@h.example.com>\r\nk: path\r\n"
        b"c: text/plain\r\nl: 2\r\n\r\nhi"
    )
    req = parse_request(data)
    validate_request(req)
    assert [n for n, _ in req.headers] == [
        "Via",
        "To",
        "From",
        "Call-ID",
        "CSeq",
        "Contact",
        "Supported",
        "Content-Type",
        "Content-Length",
    ]
    assert req.body == b"hi"
    assert b"\r\nCall-ID: abc\r\n" in req.to_bytes()


def test_folded_headers_are_unfolded_to_one_space() -> None:
    req = parse_request(
        invite(
            "Subject: I know you're there,\r\n"
            "   pick up the phone\r\n\tand talk to me!\r\n"
            "X-Empty:\r\n  \r\n"
            "X-Later:\r\n  value\r\n"
        )
    )
    assert req.headers.get("Subject") == "I know you're there, pick up the phone and talk to me!"
    assert req.headers.get("X-Empty") == ""
    assert req.headers.get("X-Later") == "value"


def test_lws_around_the_colon() -> None:
    req = parse_request(invite("Subject \t :  \t hello  \r\n"))
    assert req.headers.get("Subject") == "hello"


def test_datagram_bytes_past_content_length_are_dropped() -> None:
    req = parse_request(invite(body=b"abcdef", length=3))
    assert req.body == b"abc"


def test_datagram_without_content_length_takes_the_rest() -> None:
    req = parse_request(INVITE_HEAD.encode() + b"\r\nbody")
    assert req.body == b"body"


def test_stream_messages_need_content_length() -> None:
    with pytest.raises(StartLineError):
        parse_message(INVITE_HEAD.encode() + b"\r\n", stream=True)
    assert parse_request(invite(), stream=True).body == b""


def test_leading_crlfs_are_ignored() -> None:
    assert parse_request(b"\r\n\r\n" + invite()).method == "INVITE"


def test_message_too_large() -> None:
    with pytest.raises(MessageTooLarge) as info:
        parse_message(invite(body=b"x" * MAX_MESSAGE_SIZE))
    assert info.value.status_code == 513


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"INVITE sip:a@b SIP/2.0\r\nVia: x\r\n",  # no end of headers
        b"INVITE sip:a@b SIP/2.0\r\nTo: \xff\xfe\r\n\r\n",  # not UTF-8
        b"INVITE sip:a@b SIP/2.0\r\nTo: a\nFrom: b\r\n\r\n",  # bare LF
        b"INVITE sip:a@b SIP/2.0\r\nTo: a\rb\r\n\r\n",  # bare CR
        b"INVITE sip:a@b SIP/2.0\r\n continued\r\n\r\n",
        b"INVITE sip:a@b SIP/2.0\r\nno colon here\r\n\r\n",
        b"INVITE sip:a@b SIP/2.0\r\n: empty name\r\n\r\n",
        b"INVITE sip:a@b SIP/2.0\r\nBad Name: x\r\n\r\n",
        b"INVITE sip:a@b SIP/2.0\r\nN\xc3\xa4me: x\r\n\r\n",
    ],
)
def test_unframeable_messages_raise_plain_parse_errors(data: bytes) -> None:
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert type(info.value) is ParseError
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    "start_line",
    [
        "INVITE sip:a@b.example.com SIP/2.0 ",
        "INVITE  sip:a@b.example.com SIP/2.0",
        "INVITE sip:a@b.example.com",
        "INVITE sip:a@b.example.com SIP/2.0 extra",
        "INV/ITE sip:a@b.example.com SIP/2.0",
        "INVITE <sip:a@b.example.com> SIP/2.0",
        "INVITE sip:a@b.example.com HTTP/1.1",
        "INVITE\tsip:a@b.example.com\tSIP/2.0",
        "INVITE sip:a@b.example.com\x00 SIP/2.0",
        "INVITE sip:a@b.example.com SIP/2.0\x7f",
        "SIP/2.0 200",
        "SIP/2.0 2000 OK",
        "SIP/2.0 099 Too Low",
        "SIP/2.0 700 Too High",
        "SIP/2.0 20x OK",
        "SIP/2.0 \u0662\u0660\u0660 OK",
        "SIP/2.0 200 O\x01K",
        "",
    ],
)
def test_bad_start_lines_keep_the_headers(start_line: str) -> None:
    data = invite().replace(b"INVITE sip:bob@biloxi.example.com SIP/2.0", start_line.encode(), 1)
    with pytest.raises(StartLineError) as info:
        parse_message(data)
    assert info.value.status_code == 400
    assert info.value.partial.headers.get("Call-ID") == "a84b4c76e66710"
    assert info.value.partial.is_request == (not start_line.startswith("SIP/"))


@pytest.mark.parametrize("start_line", ["INVITE sip:a@b SIP/3.0", "SIP/1.0 200 OK"])
def test_other_versions_are_505(start_line: str) -> None:
    data = invite().replace(b"INVITE sip:bob@biloxi.example.com SIP/2.0", start_line.encode(), 1)
    with pytest.raises(VersionNotSupported) as info:
        parse_message(data)
    assert isinstance(info.value, StartLineError)
    assert info.value.status_code == 505


def test_version_and_status_line_case() -> None:
    req = parse_request(invite().replace(b"SIP/2.0\r\n", b"sip/2.0\r\n", 1))
    assert req.to_bytes().startswith(b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n")
    resp = parse_response(b"sip/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert resp.status == 200


def test_reason_phrase_may_be_empty_or_utf8() -> None:
    assert parse_response(b"SIP/2.0 100 \r\n\r\n").reason == ""
    reason = "d\u00e9j\u00e0 vu\t!"
    assert parse_response(f"SIP/2.0 486 {reason}\r\n\r\n".encode()).reason == reason


@pytest.mark.parametrize("value", ["-1", "abc", "1 2", "65536", "9" * 5000, "", "\u0661"])
def test_bad_content_length(value: str) -> None:
    with pytest.raises(StartLineError) as info:
        parse_message(invite().replace(b"Content-Length: 0", f"Content-Length: {value}".encode()))
    assert info.value.status_code == 400


def test_content_length_with_many_leading_zeros() -> None:
    assert (
        parse_request(
            invite(body=b"ab").replace(b"Length: 2", b"Length: " + b"0" * 5000 + b"2")
        ).body
        == b"ab"
    )


# --- serializing -----------------------------------------------------------------------


def test_serialize_writes_content_length_from_the_body() -> None:
    req = parse_request(invite("X-A: 1\r\n", body=b"abc"))
    req.headers.insert_before_first("X-A", "stale")
    req.headers.add("l", "99")  # a stale second one, too
    req.body = b"hello"
    data = req.to_bytes()
    assert data.count(b"Content-Length") == 1
    assert data.endswith(b"\r\nContent-Length: 5\r\n\r\nhello")
    assert bytes(req) == data


def test_serialize_adds_content_length_when_absent() -> None:
    resp = Response(200, "OK", Headers.of(("Call-ID", "x")))
    assert resp.to_bytes() == b"SIP/2.0 200 OK\r\nCall-ID: x\r\nContent-Length: 0\r\n\r\n"


def test_serialize_and_parse_round_trip() -> None:
    req = Request(
        "MESSAGE",
        "sip:bob@example.com",
        Headers.of(("v", "SIP/2.0/TCP h;branch=z9hG4bK1"), ("Subject", "caf\u00e9")),
        b"\x00\xff binary",
    )
    again = parse_request(req.to_bytes())
    # Equal: the Content-Length line parse adds is written from the body anyway.
    assert again == req
    assert again.headers.get("Content-Length") == "9"
    assert again != Request("MESSAGE", "sip:bob@example.com", req.headers, b"other")
    assert again != req.to_bytes()


def test_equality_ignores_only_content_length() -> None:
    a = Response(200, "OK", Headers.of(("Call-ID", "x"), ("Content-Length", "0")))
    b = Response(200, "OK", Headers.of(("Content-Length", "7"), ("Call-ID", "x")))
    assert a == b
    assert a != Response(200, "OK", Headers.of(("Call-ID", "y")))
    assert a != Response(200, "Okay", Headers.of(("Call-ID", "x")))


def test_messages_are_unhashable_and_copies_are_independent() -> None:
    req = parse_request(invite())
    with pytest.raises(TypeError):
        hash(req)
    c = req.copy()
    assert c == req
    c.headers.set("Max-Forwards", "69")
    assert req.max_forwards == 70
    assert c.max_forwards == 69
    resp = make_response(req, 200, to_tag="x")
    assert resp.copy() == resp


# --- typed views -----------------------------------------------------------------------


def test_views_are_cached_until_invalidated() -> None:
    req = parse_request(invite())
    via = req.top_via
    assert req.top_via is via
    req.headers.pop_first_value("Via")
    req.headers.insert_before_first("Via", "SIP/2.0/TCP proxy.example.com;branch=z9hG4bK2")
    assert req.top_via is via  # stale until invalidate()
    req.invalidate()
    assert req.top_via == Via("TCP", "proxy.example.com", None, (("branch", "z9hG4bK2"),))
    assert req.vias == [req.top_via]


def test_ruri_follows_uri_assignment() -> None:
    req = parse_request(invite())
    assert isinstance(req.ruri, SipUri) and req.ruri.user == "bob"
    req.uri = "sip:carol@chicago.example.com"
    assert isinstance(req.ruri, SipUri) and req.ruri.user == "carol"


def test_top_via_respects_quoted_commas() -> None:
    req = parse_request(
        invite().replace(
            b"branch=z9hG4bKnashds8",
            b'branch=z9hG4bKnashds8;x="a,b", SIP/2.0/UDP second.example.com',
        )
    )
    assert req.top_via.host == "pc33.atlanta.example.com"
    assert req.top_via.param("x") == '"a,b"'
    assert [v.host for v in req.vias] == ["pc33.atlanta.example.com", "second.example.com"]


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8\r\n", ""),
        ("To: Bob <sip:bob@biloxi.example.com>\r\n", ""),
        ("From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n", ""),
        ("Call-ID: a84b4c76e66710\r\n", ""),
        ("Call-ID: a84b4c76e66710\r\n", "Call-ID: a84b 4c76e66710\r\n"),
        ("Call-ID: a84b4c76e66710\r\n", "Call-ID:\r\n"),
        ("CSeq: 314159 INVITE\r\n", ""),
        ("CSeq: 314159 INVITE\r\n", "CSeq: 314159 BYE\r\n"),
        ("CSeq: 314159 INVITE\r\n", "CSeq: 314159 invite\r\n"),
        ("Max-Forwards: 70\r\n", "Max-Forwards: 256\r\n"),
        ("Max-Forwards: 70\r\n", "Max-Forwards: seventy\r\n"),
        ("Max-Forwards: 70\r\n", "Max-Forwards: 70\r\nMax-Forwards: 70\r\n"),
        ("Call-ID: a84b4c76e66710\r\n", "Call-ID: a84b4c76e66710\r\ni: other\r\n"),
        ("Via: SIP/2.0/UDP pc33", "Via: SIP/2.0/UDP pc33.example.com;;, SIP/2.0/UDP pc33"),
        ("Max-Forwards: 70\r\n", "Max-Forwards: 70\r\nDate: Sat, 13 Nov 2010 23:29:00 PST\r\n"),
        ("INVITE sip:bob@biloxi.example.com", "INVITE sip:bob@biloxi.example.com?Subject=x"),
        ("INVITE sip:bob@biloxi.example.com", "INVITE sip:bob@bil%xi.example.com"),
        ("INVITE sip:bob@biloxi.example.com", "INVITE sip:bob@biloxi.example.com:0"),
        ("To: Bob <sip:bob@biloxi.example.com>", "To: Bob <sip:bob@biloxi.example.com"),
    ],
)
def test_validate_request_rejects(old: str, new: str) -> None:
    assert old in INVITE_HEAD
    req = parse_request(invite().replace(old.encode(), new.encode(), 1))
    with pytest.raises(ParseError) as info:
        validate_request(req)
    assert type(info.value) is ParseError
    assert info.value.status_code == 400


def test_validate_request_accepts() -> None:
    validate_request(parse_request(invite("Date: Sat, 13 Nov 2010 23:29:00 GMT\r\n")))
    validate_request(parse_request(invite().replace(b"Max-Forwards: 70\r\n", b"")))
    # Contact is only checked on REGISTER, where the registrar stores it.
    validate_request(parse_request(invite("Contact: <bad uri>\r\n")))


def register(contacts: str) -> Request:
    data = (
        "REGISTER sip:example.com SIP/2.0\r\n"
        "Via: SIP/2.0/UDP h.example.com;branch=z9hG4bK1\r\n"
        "To: <sip:bob@example.com>\r\nFrom: <sip:bob@example.com>;tag=1\r\n"
        f"Call-ID: r1\r\nCSeq: 2 REGISTER\r\n{contacts}Content-Length: 0\r\n\r\n"
    ).encode()
    return parse_request(data)


def test_validate_register_contacts() -> None:
    validate_request(register("Contact: *\r\nExpires: 0\r\n"))
    validate_request(register('Contact: <sip:a@h>;expires=60, "B, C" <sip:b@h>\r\nm: sip:c@h\r\n'))
    for bad in ("Contact: <sip:a@h>;;\r\n", "Contact: sip:a@h?x=y\r\n", 'm: "x <sip:a@h>\r\n'):
        with pytest.raises(ParseError):
            validate_request(register(bad))


@pytest.mark.parametrize(
    "drop_or_dup",
    ["Via", "To", "From", "Call-ID", "CSeq", "+To", "+From", "+Call-ID", "+CSeq"],
)
def test_validate_response_rejects(drop_or_dup: str) -> None:
    resp = make_response(parse_request(invite()), 200, to_tag="t")
    validate_response(resp)
    name = drop_or_dup.lstrip("+")
    if drop_or_dup.startswith("+"):
        resp.headers.add(name, resp.headers.get(name) or "")
    else:
        resp.headers.remove(name)
    with pytest.raises(ParseError):
        validate_response(parse_response(resp.to_bytes()))


# --- make_response ---------------------------------------------------------------------


def test_make_response_copies_the_dialog_fields() -> None:
    req = parse_request(
        invite(
            "Via: SIP/2.0/UDP second.example.com;branch=z9hG4bK2\r\n"
            "Record-Route: <sip:p1.example.com;lr>\r\n"
            "Route: <sip:p2.example.com;lr>\r\nSubject: hi\r\n",
            body=b"v=0\r\n",
        )
    )
    resp = make_response(req, 200, to_tag="as83kd9bs")
    assert (resp.status, resp.reason) == (200, "OK")
    assert [n for n, _ in resp.headers] == [
        "Via",
        "To",
        "From",
        "Call-ID",
        "CSeq",
        "Via",
        "Record-Route",
    ]
    assert resp.headers.get_all("Via") == req.headers.get_all("Via")
    assert resp.headers.get("From") == req.headers.get("From")
    assert resp.headers.get("Call-ID") == req.headers.get("Call-ID")
    assert resp.headers.get("CSeq") == req.headers.get("CSeq")
    assert resp.headers.get("To") == "Bob <sip:bob@biloxi.example.com>;tag=as83kd9bs"
    assert resp.to.tag == "as83kd9bs"
    assert resp.body == b""
    validate_response(parse_response(resp.to_bytes()))


def test_make_response_to_tag_rules() -> None:
    req = parse_request(invite("Timestamp: 54\r\nRecord-Route: <sip:p1;lr>\r\n"))
    trying = make_response(req, 100, to_tag="x")
    assert trying.to.tag is None
    assert trying.headers.get("Timestamp") == "54"
    assert "Record-Route" not in trying.headers
    ringing = make_response(req, 180, to_tag="x")
    assert ringing.to.tag == "x"
    assert "Timestamp" not in ringing.headers
    assert ringing.headers.get("Record-Route") == "<sip:p1;lr>"
    busy = make_response(req, 486, to_tag="x")
    assert "Record-Route" not in busy.headers
    assert make_response(req, 200).to.tag is None  # no tag given: none added

    in_dialog = parse_request(
        invite().replace(b"biloxi.example.com>\r\n", b"biloxi.example.com>;TAG = old\r\n", 1)
    )
    assert make_response(in_dialog, 200, to_tag="new").to.tag == "old"
    # A URI parameter called "tag" is not the To tag.
    uri_tag = parse_request(
        invite().replace(b"biloxi.example.com>", b"biloxi.example.com;tag=u>", 1)
    )
    assert make_response(uri_tag, 200, to_tag="new").to.tag == "new"


def test_make_response_reason_extra_and_body() -> None:
    req = parse_request(invite())
    resp = make_response(req, 420, extra=[("Unsupported", "foo")], body=b"x")
    assert resp.reason == "Bad Extension"
    assert resp.headers.get("Unsupported") == "foo"
    assert resp.to_bytes().endswith(b"Content-Length: 1\r\n\r\nx")
    assert make_response(req, 499).reason == "Unknown"
    assert make_response(req, 404, "Nobody Here").reason == "Nobody Here"


def test_make_response_to_a_partial_message_with_a_malformed_to() -> None:
    partial = PartialMessage(
        Headers.of(
            ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"), ("To", '"open <sip:a@b>'), ("CSeq", "1 X")
        ),
        True,
    )
    resp = make_response(partial, 400, to_tag="t")
    assert resp.headers.get("To") == '"open <sip:a@b>;tag=t'
    tagged = PartialMessage(Headers.of(("To", '"open <sip:a@b>; tag=x')), True)
    assert make_response(tagged, 400, to_tag="t").headers.get("To") == '"open <sip:a@b>; tag=x'

"""RFC 4475 torture messages: each is classified exactly as the RFC asks.

§3.1.1 and most of §3.3 are valid and must parse and validate; §3.1.2 and §3.3.3/8/9
are invalid and must raise a ParseError of a specific class with the status to answer.
"""

from __future__ import annotations

import pytest

from proxy.sip.errors import ParseError, VersionNotSupported
from proxy.sip.headers import NameAddr, Via, parse_name_addr
from proxy.sip.message import (
    PartialMessage,
    Request,
    Response,
    StartLineError,
    VersionStartLineError,
    make_response,
    parse_message,
    validate_request,
    validate_response,
)
from proxy.sip.uri import AbsoluteUri, SipUri, aor_of

from .corpus import VALID, load, names

# name -> (exact exception class, status code, raised by "parse" or "validate")
INVALID: dict[str, tuple[type[ParseError], int, str]] = {
    # §3.1.2.1 extraneous header field separators (empty Via/Contact params)
    "badinv01": (ParseError, 400, "validate"),
    # §3.1.2.2 Content-Length larger than the message
    "clerr": (StartLineError, 400, "parse"),
    # §3.1.2.3 negative Content-Length
    "ncl": (StartLineError, 400, "parse"),
    # §3.1.2.4 request scalar fields with overlarge values
    "scalar02": (ParseError, 400, "validate"),
    # §3.1.2.5 response scalar fields with overlarge values
    "scalarlg": (ParseError, 400, "validate"),
    # §3.1.2.6 unterminated quoted string in display name
    "quotbal": (ParseError, 400, "validate"),
    # §3.1.2.7 <> enclosing Request-URI
    "ltgtruri": (StartLineError, 400, "parse"),
    # §3.1.2.8 malformed SIP Request-URI (embedded LWS)
    "lwsruri": (StartLineError, 400, "parse"),
    # §3.1.2.9 multiple SP separating Request-Line elements
    "lwsstart": (StartLineError, 400, "parse"),
    # §3.1.2.10 SP characters at end of Request-Line
    "trws": (StartLineError, 400, "parse"),
    # §3.1.2.11 escaped headers in SIP Request-URI
    "escruri": (ParseError, 400, "validate"),
    # §3.1.2.12 invalid time zone in Date header field
    "baddate": (ParseError, 400, "validate"),
    # §3.1.2.13 failure to enclose name-addr URI in <>
    "regbadct": (ParseError, 400, "validate"),
    # §3.1.2.14 spaces within addr-spec
    "badaspec": (ParseError, 400, "validate"),
    # §3.1.2.15 non-token characters in display name
    "baddn": (ParseError, 400, "validate"),
    # §3.1.2.16 unknown protocol version
    "badvers": (VersionStartLineError, 505, "parse"),
    # §3.1.2.17 start line and CSeq method mismatch
    "mismatch01": (ParseError, 400, "validate"),
    # §3.1.2.18 unknown method with CSeq method mismatch (400 is acceptable)
    "mismatch02": (ParseError, 400, "validate"),
    # §3.1.2.19 overlarge response code
    "bigcode": (StartLineError, 400, "parse"),
    # §3.3.1 missing mandatory header fields
    "insuf": (ParseError, 400, "validate"),
    # §3.3.3 multiple Content-Length values
    "mcl01": (StartLineError, 400, "parse"),
    # §3.3.9 multiple values in single value required fields
    "multi01": (ParseError, 400, "validate"),
}

# Requests whose headers were read before the error: they can still be answered.
ANSWERABLE_START_LINE = [
    "badvers",
    "clerr",
    "ncl",
    "ltgtruri",
    "lwsruri",
    "lwsstart",
    "trws",
    "mcl01",
]


def parse_and_validate(data: bytes) -> Request | Response:
    msg = parse_message(data)
    if isinstance(msg, Request):
        validate_request(msg)
    else:
        validate_response(msg)
    return msg


def valid(name: str) -> Request | Response:
    return parse_and_validate(load(name))


def request(name: str) -> Request:
    msg = valid(name)
    assert isinstance(msg, Request)
    return msg


def response(name: str) -> Response:
    msg = valid(name)
    assert isinstance(msg, Response)
    return msg


def test_every_corpus_file_is_classified() -> None:
    assert sorted([*VALID, *INVALID]) == names()
    assert not set(VALID) & set(INVALID)


@pytest.mark.parametrize("name", VALID)
def test_valid_messages_parse_and_validate(name: str) -> None:
    msg = valid(name)
    # Every typed view a proxy reads works on every valid message.
    assert msg.vias[0] == msg.top_via
    assert msg.call_id
    _ = msg.cseq, msg.from_, msg.to
    if isinstance(msg, Request):
        assert msg.cseq.method == msg.method
        _ = msg.ruri, msg.max_forwards


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_messages_raise_the_exact_error(name: str) -> None:
    cls, status, stage = INVALID[name]
    data = load(name)
    if stage == "parse":
        with pytest.raises(ParseError) as info:
            parse_message(data)
    else:
        msg = parse_message(data)  # framing is fine; the fields are not
        with pytest.raises(ParseError) as info:
            if isinstance(msg, Request):
                validate_request(msg)
            else:
                validate_response(msg)
    assert type(info.value) is cls
    assert info.value.status_code == status


@pytest.mark.parametrize("name", ANSWERABLE_START_LINE)
def test_bad_start_line_requests_can_be_answered(name: str) -> None:
    with pytest.raises(StartLineError) as info:
        parse_message(load(name))
    exc = info.value
    partial = exc.partial
    assert isinstance(partial, PartialMessage)
    assert partial.is_request
    resp = make_response(partial, exc.status_code)
    assert resp.status == exc.status_code
    h = partial.headers
    assert resp.headers.get_all("Via") == h.get_all("Via") != []
    assert resp.headers.get("Call-ID") == h.get("Call-ID") is not None
    assert resp.headers.get("CSeq") == h.get("CSeq") is not None
    assert resp.headers.get("From") == h.get("From")
    # The response frames; its fields are the request's (badvers's Via is SIP/7.0).
    again = parse_message(resp.to_bytes())
    assert isinstance(again, Response)
    assert again == resp
    if name != "badvers":
        validate_response(again)


def test_badvers_is_a_505_that_keeps_both_classes() -> None:
    with pytest.raises(VersionNotSupported) as info:
        parse_message(load("badvers"))
    assert isinstance(info.value, StartLineError)
    assert info.value.status_code == 505
    assert info.value.reason == "Version Not Supported"
    resp = make_response(info.value.partial, info.value.status_code)
    assert resp.to_bytes().startswith(b"SIP/2.0 505 Version Not Supported\r\n")


def test_bigcode_is_a_bad_response() -> None:
    with pytest.raises(StartLineError) as info:
        parse_message(load("bigcode"))
    assert not info.value.partial.is_request


# --- §3.1.1 valid messages, field by field ------------------------------------------


def test_wsinv() -> None:
    req = request("wsinv")
    assert req.method == "INVITE"
    assert req.uri == "sip:vivekg@chair-dnrc.example.com;unknownparam"
    assert req.vias == [
        Via("UDP", "192.0.2.2", None, (("branch", "390skdjuw"),)),
        Via("TCP", "spindle.example.com", None, (("branch", "z9hG4bK9ikj8"),)),
        Via("UDP", "192.168.255.111", None, (("branch", "z9hG4bK30239"),)),
    ]
    assert [v.branch for v in req.vias] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    assert req.to.tag == "1918181833n"
    assert req.to.uri == SipUri("sip", "vivekg", "chair-dnrc.example.com")
    assert req.from_.display_text == 'J Rosenberg \\"'
    assert req.from_.tag == "98asjd8"
    assert req.max_forwards == 68
    assert req.cseq.number == 9
    assert req.cseq.method == "INVITE"
    assert req.call_id == "wsinv.ndaksdj@192.0.2.1"
    assert req.headers.get("Subject") == ""
    assert req.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert req.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    route = parse_name_addr(req.headers.values("Route")[0])
    assert isinstance(route.uri, SipUri) and route.uri.lr
    [contact] = req.contacts
    m = parse_name_addr(contact)
    assert m.display_text == 'Quoted string ""'
    assert m.params == (("newparam", "newvalue"), ("secondparam", None), ("q", "0.33"))
    assert len(req.body) == 150 and req.body.startswith(b"v=0\r\n")


def test_intmeth() -> None:
    req = request("intmeth")
    assert req.method == "!interesting-Method0123456789_*+`.%indeed'~"
    uri = req.ruri
    assert isinstance(uri, SipUri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com"
    assert req.top_via.branch == "z9hG4bK-.!%66*_+`'~"
    assert req.to.display_text == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert isinstance(req.to.uri, SipUri)
    assert req.to.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert req.from_.display == "token1~` token2'+_ token3*%!.-"
    assert (
        req.from_.param("fromParam''~+*_!.-%")
        == '"\u0440\u0430\u0431\u043e\u0442\u0430\u044e\u0449\u0438\u0439"'
    )
    assert req.from_.tag == "_token~1'+`*%!-."
    assert req.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert req.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff\u5927\u505c\u96fb"
    assert req.max_forwards == 255


def test_esc01() -> None:
    req = request("esc01")
    assert isinstance(req.ruri, SipUri) and req.ruri.user == "sips%3Auser%40example.com"
    assert aor_of(req.to.uri) == "sip:user@example.com"
    assert isinstance(req.from_.uri, SipUri) and req.from_.uri.user == "I%20have%20spaces"
    [contact] = req.contacts
    uri = parse_name_addr(contact).uri
    assert uri == SipUri(
        "sip",
        "cal%6Cer",
        "host5.example.net",
        None,
        (("%6C%72", None), ("n%61me", "v%61lue%25%34%31")),
    )
    assert aor_of(uri) == "sip:caller@host5.example.net"
    assert len(req.body) == 150


def test_escnull() -> None:
    req = request("escnull")
    assert isinstance(req.to.uri, SipUri) and req.to.uri.user == "null-%00-null"
    assert aor_of(req.to.uri) == "sip:null-%00-null@example.com"
    users = [parse_name_addr(c).uri for c in req.contacts]
    assert [u.user for u in users if isinstance(u, SipUri)] == ["%00", "%00%00"]


def test_esc02() -> None:
    req = request("esc02")
    # Not REGISTER: an unknown method, whose CSeq matches it exactly.
    assert req.method == "RE%47IST%45R"
    assert req.cseq.method == "RE%47IST%45R"
    assert req.to.display == '"%Z%45"'
    assert req.top_via.transport == "TCP"
    assert req.top_via.branch == "z9hG4bK209%fzsnel234"
    # C%6Fntact is an extension header, not a third Contact.
    assert req.headers.get_all("Contact") == [
        "<sip:alias1@host1.example.com>",
        "<sip:alias3@host3.example.com>",
    ]
    assert req.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"


def test_lwsdisp() -> None:
    req = request("lwsdisp")
    assert req.from_.display == "caller"
    assert req.from_.tag == "323"
    assert req.from_.uri == SipUri("sip", "caller", "example.com")


def test_longreq() -> None:
    req = request("longreq")
    vias = req.vias
    assert len(vias) == 34
    assert [v.host for v in vias[:33]] == [f"sip{n}.example.com" for n in range(33, 0, -1)]
    assert all(v.transport == "TCP" for v in vias)
    assert vias[-1].received == "192.0.2.5"
    assert (vias[-1].branch or "").startswith("verylonglong")
    assert isinstance(req.to.uri, SipUri) and req.to.uri.port == 6000
    long_name = "longparam" + "name" * 25
    assert req.to.uri.param(long_name) == "shortvalue"
    assert (req.from_.tag or "").startswith("12982982982")
    assert req.from_.params[-1][1] is None
    assert len(req.body) == 150


def test_dblreq_ignores_the_second_message() -> None:
    req = request("dblreq")
    assert req.method == "REGISTER"
    assert req.body == b""
    assert req.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"
    assert req.top_via.branch == "z9hG4bKkdjuw23492"


def test_semiuri() -> None:
    req = request("semiuri")
    assert req.ruri == SipUri("sip", "user;par=u%40example.net", "example.com")
    assert aor_of(req.ruri) == "sip:user;par=u%40example.net@example.com"
    assert req.headers.values("Accept") == [
        "application/sdp",
        "application/pkcs7-mime",
        "multipart/mixed",
        "multipart/signed",
        "message/sip",
        "message/sipfrag",
    ]


def test_transports() -> None:
    req = request("transports")
    assert [v.transport for v in req.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert req.call_id == "transports.kijh4akdnaqjkwendsasfdj"


def test_mpart01() -> None:
    req = request("mpart01")
    assert req.method == "MESSAGE"
    assert len(req.body) == 553
    assert req.body.endswith(b"--7a9cbec02ceef655--\r\n")
    assert req.top_via.rport == ""
    assert req.top_via.port == 5070


def test_unreason_and_noreason() -> None:
    resp = response("unreason")
    assert resp.status == 200
    assert resp.reason.startswith("= 2**3 * 5**2 \u043d\u043e \u0441\u0442\u043e")
    assert len(resp.body) == 154
    resp = response("noreason")
    assert resp.status == 100
    assert resp.reason == ""


# --- §3.3 valid messages that a proxy treats specially --------------------------------


def test_badbranch_branch_is_just_the_cookie() -> None:
    assert request("badbranch").top_via.branch == "z9hG4bK"


def test_bcast() -> None:
    resp = response("bcast")
    assert [v.host for v in resp.vias] == ["192.0.2.198", "255.255.255.255"]


def test_bext01_lists_unknown_extensions() -> None:
    req = request("bext01")
    assert req.headers.values("Proxy-Require") == [
        "noProxiesSupportThis",
        "norDoAnyProxiesSupportThis",
    ]
    assert req.top_via.transport == "TLS"


def test_cparam01_unbracketed_contact_param_is_a_header_param() -> None:
    [contact] = request("cparam01").contacts
    m = parse_name_addr(contact)
    assert not m.bracketed
    assert m.uri == SipUri("sip", "+19725552222", "gw1.example.net")
    assert m.params == (("unknownparam", None),)


def test_cparam02_bracketed_contact_param_is_a_uri_param() -> None:
    [contact] = request("cparam02").contacts
    m = parse_name_addr(contact)
    assert m.bracketed
    assert isinstance(m.uri, SipUri) and m.uri.params == (("unknownparam", None),)
    assert m.params == ()


def test_regescrt_contact_keeps_its_escaped_headers() -> None:
    [contact] = request("regescrt").contacts
    uri = parse_name_addr(contact).uri
    assert isinstance(uri, SipUri)
    assert uri.headers == "Route=%3Csip:sip.example.com%3E"


def test_regaut01_unknown_auth_scheme_is_kept() -> None:
    req = request("regaut01")
    assert req.headers.get("Authorization") == "NoOneKnowsThisScheme opaque-data=here"


def test_invut_and_sdp01() -> None:
    req = request("invut")
    assert req.headers.get("Content-Type") == "application/unknownformat"
    assert len(req.body) == 40
    assert request("sdp01").headers.get("Accept") == "text/nobodyKnowsThis"


def test_unknown_request_uri_schemes_parse_as_absolute_uris() -> None:
    assert request("unkscm").ruri == AbsoluteUri("nobodyknowsthisscheme", "totallyopaquecontent")
    assert request("novelsc").ruri == AbsoluteUri("soap.beep", "//192.0.2.103:3002")


def test_unksm2_unknown_schemes_in_header_fields() -> None:
    req = request("unksm2")
    assert req.to == NameAddr(AbsoluteUri("isbn", "2983792873"), bracketed=False)
    assert req.from_.uri == AbsoluteUri("http", "//www.example.com")
    assert req.from_.tag == "3234233"
    [contact] = req.contacts
    assert parse_name_addr(contact).uri == AbsoluteUri("name", "John_Smith")


def test_zeromf() -> None:
    assert request("zeromf").max_forwards == 0


def test_inv2543_rfc2543_request_is_accepted() -> None:
    req = request("inv2543")
    assert req.max_forwards is None
    assert req.top_via.branch is None
    assert req.from_.tag is None
    # RFC 3261 §20: an unbracketed URI's ";user=phone" is a header parameter of To.
    assert req.to.uri == SipUri("sip", "+16505552222", "ss1.example.net")
    assert req.to.param("user") == "phone"

"""Header fields: names, the ordered header list, and the typed views (grammar included)."""

from __future__ import annotations

import pytest

from proxy.sip.errors import ParseError
from proxy.sip.grammar import (
    first_element,
    format_params,
    get_param,
    has_param,
    parse_params,
    quote,
    split_commas,
    unquote,
)
from proxy.sip.headers import (
    COMPACT,
    CSeq,
    Headers,
    NameAddr,
    Via,
    canonical_name,
    parse_cseq,
    parse_delta_seconds,
    parse_name_addr,
    parse_uint,
    parse_via,
)
from proxy.sip.uri import AbsoluteUri, SipUri, TelUri

# --- names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("v", "Via"),
        ("V", "Via"),
        ("VIA", "Via"),
        ("i", "Call-ID"),
        ("call-id", "Call-ID"),
        ("cseq", "CSeq"),
        ("m", "Contact"),
        ("f", "From"),
        ("t", "To"),
        ("l", "Content-Length"),
        ("c", "Content-Type"),
        ("k", "Supported"),
        ("MaX-fOrWaRdS", "Max-Forwards"),
        ("www-authenticate", "WWW-Authenticate"),
        ("NewFangledHeader", "NewFangledHeader"),
        ("C%6Fntact", "C%6Fntact"),
    ],
)
def test_canonical_name(name: str, canonical: str) -> None:
    assert canonical_name(name) == canonical


def test_every_compact_form_expands_to_a_long_name() -> None:
    for short, long in COMPACT.items():
        assert len(short) == 1
        assert canonical_name(short.upper()) == long
        assert canonical_name(long.lower()) == long


# --- Headers -----------------------------------------------------------------------------


def sample() -> Headers:
    return Headers.of(
        ("v", "SIP/2.0/UDP a.example.com;branch=z9hG4bK1"),
        ("Via", "SIP/2.0/TCP b.example.com;branch=z9hG4bK2, SIP/2.0/UDP c.example.com"),
        ("Route", "<sip:p1.example.com;lr>"),
        ("To", "<sip:bob@example.com>"),
        ("Route", "<sip:p2.example.com;lr>"),
        ("X-Custom", "1"),
    )


def test_lookup_accepts_any_spelling_of_a_known_name() -> None:
    h = sample()
    assert h.get("via") == h.get("v") == h.get("Via") == "SIP/2.0/UDP a.example.com;branch=z9hG4bK1"
    assert h.count("V") == 2
    assert len(h.get_all("ROUTE")) == 2
    assert "t" in h and "To" in h and "From" not in h
    assert 42 not in h
    assert h.get("X-Custom") == "1"
    assert h.get("Missing") is None
    assert h.get_all("Missing") == []
    assert h.values("Missing") == []


def test_values_split_comma_lists_across_lines() -> None:
    assert [v.split(";")[0] for v in sample().values("Via")] == [
        "SIP/2.0/UDP a.example.com",
        "SIP/2.0/TCP b.example.com",
        "SIP/2.0/UDP c.example.com",
    ]


def test_values_keep_commas_inside_quotes_and_brackets() -> None:
    h = Headers.of(
        ("Contact", '"Bell, Alexander" <sip:a@b.example.com;x=",">;q=0.5, <sip:c@d,e>'),
    )
    assert h.values("Contact") == [
        '"Bell, Alexander" <sip:a@b.example.com;x=",">;q=0.5',
        "<sip:c@d,e>",
    ]


def test_set_replaces_every_line_at_the_first_position() -> None:
    h = sample()
    h.set("route", "<sip:new.example.com;lr>")
    assert list(h)[2] == ("Route", "<sip:new.example.com;lr>")
    assert h.get_all("Route") == ["<sip:new.example.com;lr>"]
    assert len(h) == 5
    h.set("Max-Forwards", "70")
    assert list(h)[-1] == ("Max-Forwards", "70")


def test_remove() -> None:
    h = sample()
    h.remove("route")
    assert "Route" not in h
    assert len(h) == 4
    h.remove("Nothing")
    assert len(h) == 4


def test_insert_before_first_and_prepend() -> None:
    h = sample()
    h.insert_before_first("route", "<sip:p0.example.com;lr>")
    assert h.get_all("Route")[0] == "<sip:p0.example.com;lr>"
    assert list(h)[2] == ("Route", "<sip:p0.example.com;lr>")
    h.insert_before_first("Record-Route", "<sip:rr.example.com;lr>")
    assert next(iter(h)) == ("Record-Route", "<sip:rr.example.com;lr>")
    h.prepend("m", "<sip:x@y>")
    assert next(iter(h)) == ("Contact", "<sip:x@y>")


def test_pop_first_value() -> None:
    h = sample()
    assert h.pop_first_value("Via") == "SIP/2.0/UDP a.example.com;branch=z9hG4bK1"
    assert h.pop_first_value("v") == "SIP/2.0/TCP b.example.com;branch=z9hG4bK2"
    assert h.get_all("Via") == ["SIP/2.0/UDP c.example.com"]
    assert h.pop_first_value("Via") == "SIP/2.0/UDP c.example.com"
    assert "Via" not in h
    assert h.pop_first_value("Via") is None
    q = Headers.of(("Route", '<sip:a;x=",">, <sip:b>'))
    assert q.pop_first_value("Route") == '<sip:a;x=",">'
    assert q.get("Route") == "<sip:b>"


def test_copy_is_independent_and_equality_is_ordered() -> None:
    h = sample()
    c = h.copy()
    assert c == h
    c.add("Max-Forwards", "70")
    assert c != h
    assert Headers.of(("a", "1"), ("b", "2")) != Headers.of(("b", "2"), ("a", "1"))
    assert h != list(h)


def test_add_canonicalizes() -> None:
    h = Headers()
    h.add("i", "abc")
    h.add("content-length", "0")
    assert list(h) == [("Call-ID", "abc"), ("Content-Length", "0")]
    assert repr(Headers.of(("t", "x"))) == "Headers([('To', 'x')])"


# --- grammar helpers -------------------------------------------------------------------


def test_split_commas_and_first_element() -> None:
    assert split_commas("a") == ["a"]
    assert split_commas(" a , b,c ") == ["a", "b", "c"]
    assert split_commas("a,,b") == ["a", "", "b"]  # empty elements are the caller's to reject
    assert split_commas('"x,y", <u,v>, z') == ['"x,y"', "<u,v>", "z"]
    assert split_commas('"a\\",b", c') == ['"a\\",b"', "c"]
    assert first_element(" a , b") == "a"
    assert first_element('"x,y" <s:a>, z') == '"x,y" <s:a>'
    assert first_element("<u,v>, z") == "<u,v>"
    assert first_element("<u,v>") == "<u,v>"
    assert first_element("a") == "a"
    with pytest.raises(ParseError):
        split_commas('"open, b')
    with pytest.raises(ParseError):
        first_element('"open, b')


def test_parse_params_allows_lws_around_separators() -> None:
    params, end = parse_params(" ;  tag    = 1918181833n ; lr;q=0.5 ", 0)
    assert params == (("tag", "1918181833n"), ("lr", None), ("q", "0.5"))
    assert end == len(" ;  tag    = 1918181833n ; lr;q=0.5 ")
    params, end = parse_params(';p="a;b,c" rest', 0)
    assert params == (("p", '"a;b,c"'),)
    assert end == len(';p="a;b,c" ')
    assert parse_params(";received=[2001:db8::1]", 0)[0] == (("received", "[2001:db8::1]"),)


@pytest.mark.parametrize("text", [";", ";;", "; =x", ";a=", ';a="open', ";a= ;b"])
def test_parse_params_errors(text: str) -> None:
    with pytest.raises(ParseError):
        parse_params(text, 0)


def test_param_access_is_case_insensitive() -> None:
    params = (("Tag", "x"), ("lr", None))
    assert get_param(params, "tag") == "x"
    assert get_param(params, "LR") == ""
    assert get_param(params, "q") is None
    assert has_param(params, "lr") and not has_param(params, "q")
    assert format_params(params) == ";Tag=x;lr"


def test_quote_and_unquote() -> None:
    assert quote('a "b" \\') == '"a \\"b\\" \\\\"'
    assert unquote(quote('a "b" \\')) == 'a "b" \\'
    assert unquote("token") == "token"
    assert unquote('"plain"') == "plain"


# --- Via -----------------------------------------------------------------------------


def test_parse_via() -> None:
    via = parse_via("SIP/2.0/UDP pc33.example.com:5066;branch=z9hG4bK776;rport;received=192.0.2.1")
    assert via == Via(
        "UDP",
        "pc33.example.com",
        5066,
        (("branch", "z9hG4bK776"), ("rport", None), ("received", "192.0.2.1")),
    )
    assert via.branch == "z9hG4bK776"
    assert via.rport == ""
    assert via.received == "192.0.2.1"
    assert (
        str(via) == "SIP/2.0/UDP pc33.example.com:5066;branch=z9hG4bK776;rport;received=192.0.2.1"
    )


def test_parse_via_with_lws_everywhere() -> None:
    via = parse_via("sip  /   2.0 /tcp    Spindle.example.com  :  5070 ;  branch  =   z9hG4bK9ikj8")
    assert via.transport == "TCP"
    assert via.sent_by() == ("spindle.example.com", 5070)
    assert via.branch == "z9hG4bK9ikj8"


def test_parse_via_ipv6() -> None:
    via = parse_via("SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKx;received=[2001:db8::10]")
    assert (via.host, via.port) == ("[2001:db8::9]", 5061)
    assert via.received == "[2001:db8::10]"
    assert parse_via(str(via)) == via


def test_via_with_params_round_trips() -> None:
    via = parse_via("SIP/2.0/UDP h;branch=z9hG4bK1").with_params((("branch", "z9hG4bK2"),))
    assert parse_via(str(via)) == via
    assert via.rport is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ",
        "SIP/2.0 host",
        "SIP//UDP host",
        "SIP/2.0/UDPhost",
        "HTTP/2.0/UDP host",
        "SIP/2.0/ host",
        "SIP/2.0/UDP host:0",
        "SIP/2.0/UDP host:65536",
        "SIP/2.0/UDP host:" + "9" * 5000,
        "SIP/2.0/UDP host:",
        "SIP/2.0/UDP ho!st",
        "SIP/2.0/UDP [2001:db8::1",
        "SIP/2.0/UDP host;;",
        "SIP/2.0/UDP 192.0.2.15;;,;,,",
        "SIP/2.0/UDP host;branch=",
        "SIP/2.0/UDP host junk",
        "SIP/2.0/UDP host;branch=a b",
    ],
)
def test_malformed_vias(text: str) -> None:
    with pytest.raises(ParseError):
        parse_via(text)


# --- name-addr -----------------------------------------------------------------------


def test_name_addr_with_quoted_display() -> None:
    na = parse_name_addr('"Bell, \\"Alex\\"" <sip:a.g.bell@example.com> ; tag = 43 ;x')
    assert na.display == '"Bell, \\"Alex\\""'
    assert na.display_text == 'Bell, "Alex"'
    assert na.uri == SipUri("sip", "a.g.bell", "example.com")
    assert na.params == (("tag", "43"), ("x", None))
    assert na.tag == "43"
    assert na.bracketed
    assert str(na) == '"Bell, \\"Alex\\"" <sip:a.g.bell@example.com>;tag=43;x'


def test_name_addr_with_token_display() -> None:
    na = parse_name_addr("A. G.  Bell <sip:bell@example.com>")
    assert na.display == "A. G.  Bell"
    assert na.display_text == "A. G.  Bell"
    assert parse_name_addr("caller<sip:caller@example.com>;tag=323").display == "caller"


def test_name_addr_without_display() -> None:
    na = parse_name_addr("<sip:bob@example.com;transport=tcp>;expires=60")
    assert na.display is None
    assert isinstance(na.uri, SipUri) and na.uri.transport == "tcp"
    assert na.param("expires") == "60"
    assert str(na) == "<sip:bob@example.com;transport=tcp>;expires=60"


def test_addr_spec_parameters_belong_to_the_header() -> None:
    # RFC 3261 §20: without <>, ";" starts header parameters, not URI parameters.
    na = parse_name_addr("sip:bob@example.com;tag=1;user=phone")
    assert not na.bracketed
    assert na.uri == SipUri("sip", "bob", "example.com")
    assert na.params == (("tag", "1"), ("user", "phone"))
    assert str(na) == "<sip:bob@example.com>;tag=1;user=phone"
    assert parse_name_addr(str(na)).params == na.params


def test_name_addr_other_schemes() -> None:
    assert parse_name_addr("<tel:+1-555>;tag=a").uri == TelUri("+1-555")
    assert parse_name_addr("isbn:2983792873").uri == AbsoluteUri("isbn", "2983792873")
    assert parse_name_addr("<name:John_Smith>") == NameAddr(AbsoluteUri("name", "John_Smith"))


def test_name_addr_with_params_and_uri_with_ipv6() -> None:
    na = parse_name_addr("<sip:[2001:db8::1]:5060>").with_params((("tag", "x"),))
    assert str(na) == "<sip:[2001:db8::1]:5060>;tag=x"
    assert parse_name_addr(str(na)) == na


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "*",
        '"Mr. J. User <sip:j.user@example.com>',  # quotbal
        '"Joe" sip:joe@example.com',
        "<sip:joe@example.com",
        "< sip:t.watson@example.org >",  # badaspec
        "<>",
        "Bell, Alexander <sip:a.g.bell@example.com>",  # baddn
        "Bell@home <sip:a@example.com>",
        "sip:user@example.com?Route=%3Csip:sip.example.com%3E",  # regbadct
        "sip:user@example.com x",
        "<sip:user@example.com>junk",
        "<sip:user@example.com>;",
        "<sip:user@example.com>;;;;",
        "<sip:user@example.com>;tag=",
        "<sip:us er@example.com>",
        "<sip:user@example.com;>",
        "<not a uri>",
        "\x0b<sip:a@b>",
    ],
)
def test_malformed_name_addrs(text: str) -> None:
    with pytest.raises(ParseError):
        parse_name_addr(text)


def test_tag_inside_the_uri_is_not_the_header_tag() -> None:
    na = parse_name_addr("<sip:bob@example.com;tag=uri>")
    assert na.tag is None
    assert parse_name_addr("<sip:bob@example.com>;tag").tag == ""


# --- CSeq and numbers ------------------------------------------------------------------


def test_parse_cseq() -> None:
    assert parse_cseq("1 INVITE") == CSeq(1, "INVITE")
    assert parse_cseq(" 0009 \t INVITE ") == CSeq(9, "INVITE")
    assert parse_cseq("2147483647 X") == CSeq(2**31 - 1, "X")
    assert str(CSeq(4, "ACK")) == "4 ACK"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "INVITE",
        "1",
        "1 ",
        "1 INVITE extra",
        "-1 INVITE",
        "+1 INVITE",
        "2147483648 INVITE",
        "36893488147419103232 REGISTER",
        "9" * 5000 + " INVITE",
        "\u0661 INVITE",  # Arabic-Indic digit one
        "\u00b9 INVITE",  # superscript one: str.isdigit() says yes
        "1\u3000INVITE",  # ideographic space is not LWS
        "1 INV/ITE",
    ],
)
def test_malformed_cseq(text: str) -> None:
    with pytest.raises(ParseError):
        parse_cseq(text)


def test_parse_uint() -> None:
    assert parse_uint("0068", "Max-Forwards", 255) == 68
    assert parse_uint(" 255 ", "Max-Forwards", 255) == 255
    assert parse_uint("0" * 5000, "Content-Length", 65535) == 0
    for bad in ("256", "9" * 5000, "", " ", "-1", "1.0", "0x10", "\u0661", "\u00b2"):
        with pytest.raises(ParseError):
            parse_uint(bad, "Max-Forwards", 255)


def test_parse_delta_seconds_clamps_huge_values() -> None:
    assert parse_delta_seconds("3600") == 3600
    assert parse_delta_seconds("1" + "0" * 100) == 2**32 - 1
    assert parse_delta_seconds("4294967296") == 2**32 - 1
    assert parse_delta_seconds("9" * 5000) == 2**32 - 1
    assert parse_delta_seconds("0" * 5000) == 0
    assert parse_delta_seconds("120", maximum=60) == 60
    for bad in ("", "-1", "1e3", "\u00b2"):
        with pytest.raises(ParseError):
            parse_delta_seconds(bad)

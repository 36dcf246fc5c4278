"""SIP, SIPS, tel and opaque URIs, and AOR normalization."""

from __future__ import annotations

import pytest

from proxy.sip.errors import ParseError
from proxy.sip.uri import (
    AbsoluteUri,
    SipUri,
    TelUri,
    aor_of,
    normalize_escapes,
    parse_host,
    parse_uri,
)


def sip(text: str) -> SipUri:
    uri = parse_uri(text)
    assert isinstance(uri, SipUri)
    return uri


def test_full_sip_uri() -> None:
    uri = sip("sips:alice:secret@Example.COM:5061;transport=TCP;lr;maddr=[2001:db8::1]?subject=x")
    assert uri.scheme == "sips"
    assert uri.user == "alice"
    assert uri.password == "secret"
    assert uri.host == "Example.COM"  # as written; compare lower-cased
    assert uri.port == 5061
    assert uri.params == (("transport", "TCP"), ("lr", None), ("maddr", "[2001:db8::1]"))
    assert uri.headers == "subject=x"
    assert uri.transport == "tcp"
    assert uri.lr
    assert uri.param("TRANSPORT") == "TCP"


def test_minimal_sip_uri() -> None:
    uri = sip("sip:example.com")
    assert uri == SipUri("sip", None, "example.com")
    assert uri.transport == "udp"
    assert not uri.lr
    assert sip("sips:example.com").transport == "tls"


def test_scheme_is_case_insensitive() -> None:
    assert sip("SIP:bob@example.com").scheme == "sip"
    assert sip("SiPs:bob@example.com").scheme == "sips"


def test_user_part_may_hold_semicolons_and_escapes() -> None:
    uri = sip("sip:user;par=u%40example.net@example.com;p=1")
    assert uri.user == "user;par=u%40example.net"
    assert uri.host == "example.com"
    assert uri.params == (("p", "1"),)


def test_empty_password_is_kept() -> None:
    uri = sip("sip:bob:@example.com")
    assert uri.password == ""
    assert str(uri) == "sip:bob:@example.com"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("sip:[2001:db8::1]", "[2001:db8::1]", None),
        ("sip:bob@[2001:db8::1]:5070;transport=tcp", "[2001:db8::1]", 5070),
        ("sip:[::ffff:192.0.2.1]:1", "[::ffff:192.0.2.1]", 1),
        ("sip:192.0.2.1:65535", "192.0.2.1", 65535),
        ("sip:host:05060", "host", 5060),
        ("sip:host:" + "0" * 5000 + "1", "host", 1),  # no int() of 5001 digits
    ],
)
def test_hosts_and_ports(text: str, host: str, port: int | None) -> None:
    uri = sip(text)
    assert (uri.host, uri.port) == (host, port)


@pytest.mark.parametrize(
    "text",
    [
        "sip:host:0",
        "sip:host:65536",
        "sip:host:99999",
        "sip:host:" + "9" * 5000,  # int() would raise ValueError past 4300 digits
        "sip:host:",
        "sip:host:-1",
        "sip:host:50x",
        "sip:host:\uff15\uff10\uff16\uff10",  # full-width digits
        "sip:host:\u0665",  # Arabic-Indic digit five
    ],
)
def test_bad_ports(text: str) -> None:
    with pytest.raises(ParseError):
        parse_uri(text)


@pytest.mark.parametrize(
    "text",
    [
        "sip:[2001:db8::1",
        "sip:[2001:db8::1]x",
        "sip:[]",
        "sip:[zz::1]",
        "sip:[1:2]",
        "sip:[192.0.2.1]",
        "sip:[::1%eth0]",
        "sip:[::1]]",
    ],
)
def test_bad_ipv6_references(text: str) -> None:
    with pytest.raises(ParseError):
        parse_uri(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sip",
        ":user@host",
        "1sip:host",
        "s p:host",
        "sip:",
        "sip:@host",
        "sip::pw@host",
        "sip:user@",
        "sip:us er@host",
        "sip:user@ho st",
        "sip:<user>@host",
        "sip:user@host;",
        "sip:user@host;;lr",
        "sip:user@host;=x",
        "sip:user@host;a=",
        "sip:user@host;a b",
        "sip:%zz@host",
        "sip:%4@host",
        "sip:user%@host",
        "sip:user@host?a b",
        "sip:user@ho_st",
        "sip:us\u00e9r@host",
        "sip:user@host\x00",
        'sip:user"@host',
    ],
)
def test_malformed_sip_uris(text: str) -> None:
    with pytest.raises(ParseError):
        parse_uri(text)


def test_tel_uris() -> None:
    uri = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert uri == TelUri("+1-201-555-0123", (("phone-context", "example.com"),))
    assert uri.scheme == "tel"
    assert str(uri) == "tel:+1-201-555-0123;phone-context=example.com"
    assert parse_uri("TEL:7042") == TelUri("7042")
    for bad in ("tel:", "tel:;x=1", "tel:+1 555", "tel:+1;", "tel:+1;=2", "tel:<1>"):
        with pytest.raises(ParseError):
            parse_uri(bad)


def test_other_schemes_are_opaque() -> None:
    assert parse_uri("http://www.example.com") == AbsoluteUri("http", "//www.example.com")
    assert parse_uri("isbn:2983792873") == AbsoluteUri("isbn", "2983792873")
    assert parse_uri("soap.beep://192.0.2.103:3002") == AbsoluteUri(
        "soap.beep", "//192.0.2.103:3002"
    )
    assert str(parse_uri("Name:John_Smith")) == "name:John_Smith"
    for bad in ("http:", "foo:a b", 'foo:a"b', "foo:<x>", "foo:\u00e9", "foo:a\tb"):
        with pytest.raises(ParseError):
            parse_uri(bad)


@pytest.mark.parametrize(
    "text",
    [
        "sip:example.com",
        "sips:alice:secret@example.com:5061;transport=tcp;lr?subject=x&priority=urgent",
        "sip:%61lice@[2001:db8::1]:5070;maddr=192.0.2.1",
        "sip:user;par=u%40example.net@example.com",
        "tel:+1-201-555-0123;phone-context=example.com",
        "urn:service:sos",
    ],
)
def test_str_round_trip(text: str) -> None:
    assert str(parse_uri(text)) == text


def test_with_params() -> None:
    uri = sip("sip:bob@example.com;lr").with_params((("transport", "tcp"),))
    assert str(uri) == "sip:bob@example.com;transport=tcp"


def test_parse_host() -> None:
    assert parse_host("Example.com:5060") == ("Example.com", 5060)
    assert parse_host("[::1]") == ("[::1]", None)
    for bad in ("", ":5060", "a b", "[::1]5060", "host:5060:1"):
        with pytest.raises(ParseError):
            parse_host(bad)


# --- AOR normalization -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "aor"),
    [
        ("sip:alice@example.com", "sip:alice@example.com"),
        ("sip:alice@EXAMPLE.Com", "sip:alice@example.com"),
        ("SIPS:alice@example.com", "sip:alice@example.com"),
        ("sips:alice:secret@example.com:5061;transport=tls?subject=x", "sip:alice@example.com"),
        ("sip:alice@example.com;user=phone;lr", "sip:alice@example.com"),
        ("sip:Alice@example.com", "sip:Alice@example.com"),  # the user part is case-sensitive
        ("sip:%61lice@example.com", "sip:alice@example.com"),
        ("sip:%75se%72@example.com", "sip:user@example.com"),
        ("sip:a%2fb@example.com", "sip:a/b@example.com"),
        # Escapes of characters a user part cannot hold plainly stay, upper-cased.
        ("sip:I%20have%20spaces@example.net", "sip:I%20have%20spaces@example.net"),
        ("sip:a%2ab%3a@example.net", "sip:a*b%3A@example.net"),
        ("sip:null-%00-null@example.com", "sip:null-%00-null@example.com"),
        ("sip:%c3%a9@example.com", "sip:%C3%A9@example.com"),
        ("sip:sips%3Auser%40example.com@example.net", "sip:sips%3Auser%40example.com@example.net"),
        ("sip:example.com:5060", "sip:example.com"),
        ("sip:bob@[2001:DB8:0::1]:5060", "sip:bob@[2001:db8::1]"),
    ],
)
def test_aor_of(text: str, aor: str) -> None:
    assert aor_of(parse_uri(text)) == aor


def test_equivalent_uris_have_one_aor() -> None:
    spellings = [
        "sip:alice@example.com",
        "sips:alice@EXAMPLE.COM",
        "sip:%61lice@example.com:5060",
        "sip:%61%6C%69%63%65@Example.Com;transport=udp",
    ]
    assert {aor_of(parse_uri(s)) for s in spellings} == {"sip:alice@example.com"}


def test_aor_is_a_valid_ascii_uri() -> None:
    for text in ("sip:%ff%fe@example.com", "sip:a%20b%00@example.com"):
        aor = aor_of(parse_uri(text))
        assert aor.isascii()
        assert aor_of(parse_uri(aor)) == aor


def test_aor_of_tel_and_other_schemes() -> None:
    assert aor_of(parse_uri("tel:+14085551234"), "Example.COM") == "sip:+14085551234@example.com"
    with pytest.raises(ParseError):
        aor_of(parse_uri("tel:+14085551234"))
    with pytest.raises(ParseError):
        aor_of(parse_uri("http://www.example.com"))


def test_normalize_escapes() -> None:
    assert normalize_escapes("plain") == "plain"
    assert normalize_escapes("%41%2c%2C%7e%25") == "A,,~%25"
    assert normalize_escapes("100%") == "100%"  # a hand-built URI: no escape to resolve

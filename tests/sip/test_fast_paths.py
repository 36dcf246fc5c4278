"""The parser's fast paths give what its full scanners give, errors included.

Each fast path (a regex for the common form, a cache of header names, views parsed
once) keeps the scanner it short-cuts and falls back to it; these properties check that
on any input the two agree: the same result, or both a ParseError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip import message
from proxy.sip.errors import ParseError
from proxy.sip.forwarding import received_params
from proxy.sip.grammar import (
    GEN_VALUE_CHARS,
    TOKEN_CHARS,
    WS,
    _scan_params,
    first_element,
    is_token,
    parse_params,
    scan,
)
from proxy.sip.headers import Headers, _scan_via, parse_via
from proxy.sip.message import Request, parse_message, validate_request
from proxy.sip.registrar import contact_key, uri_key
from proxy.sip.uri import _scan_sip_uri, parse_sip_uri, parse_uri
from tests.sip import corpus

# Characters that matter to these grammars, and some that do not belong in them.
_ALPHABET = "aZ09-._!%*+`'~:;=[]@?,\"\\ \t<>/&$()éx²\x7f"
texts = st.text(alphabet=_ALPHABET, max_size=40)


def _outcome(parse: Callable[..., Any], *args: Any) -> object:
    try:
        return parse(*args)
    except ParseError:
        return ParseError


def _loop_scan(s: str, i: int, chars: frozenset[str]) -> int:
    while i < len(s) and s[i] in chars:
        i += 1
    return i


@given(texts, st.integers(0, 40))
def test_scan_runs_match_the_loop(s: str, i: int) -> None:
    i = min(i, len(s))
    for chars in (TOKEN_CHARS, GEN_VALUE_CHARS):
        assert scan(s, i, chars) == _loop_scan(s, i, chars)
    assert is_token(s) == (bool(s) and all(c in TOKEN_CHARS for c in s))


params_texts = st.lists(
    st.tuples(
        st.sampled_from(["", " ", "\t "]),
        st.sampled_from(["branch", "rport", "x", "", "a b", "é"]),
        st.sampled_from(["", "=", " = ", "=\t"]),
        st.sampled_from(["", "z9hG4bK-1", '"q v"', '"un', '"a\\"b"', "1.2.3.4", "[::1]", "é"]),
    ),
    max_size=4,
).map(lambda ps: "".join(f"{w};{n}{e}{v}" for w, n, e, v in ps))


@given(st.one_of(texts, params_texts, params_texts.map(lambda s: s + " junk")))
def test_parse_params_matches_the_scanner(s: str) -> None:
    assert _outcome(parse_params, s, 0) == _outcome(_scan_params, s, 0)


via_texts = st.tuples(
    st.sampled_from(["SIP/2.0/UDP", "SIP/2.0/tcp", "sip/2.0/UDP", "SIP / 2.0 / UDP", "SIP/7.0/X"]),
    st.sampled_from([" ", "  ", "\t", ""]),
    st.sampled_from(["192.0.2.1", "host.example", "[2001:db8::1]", "[::1", "h_x", "", "é"]),
    st.sampled_from(["", ":5060", ":0", ":70000", ":", " : 5062", ":5060²", ":05060"]),
    st.one_of(params_texts, texts),
).map("".join)


@settings(max_examples=300)
@given(st.one_of(via_texts, texts))
def test_parse_via_matches_the_scanner(s: str) -> None:
    assert _outcome(parse_via, s) == _outcome(_scan_via, s)


uri_rests = st.tuples(
    st.sampled_from(["", "alice@", "a;b?c@", "a:pw@", "%61@", "@", "a@b@"]),
    st.sampled_from(["p2psip.test", "192.0.2.10", "[::1]", "h_x", "", "é"]),
    st.sampled_from(["", ":5060", ":0", ":", ":99999"]),
    st.sampled_from(["", ";transport=udp", ";lr", ";", ";a=", ";x=%41", ";a=b@c", ";a b"]),
    st.sampled_from(["", "?h=v", "?"]),
).map("".join)


@settings(max_examples=300)
@given(st.one_of(uri_rests, texts))
def test_parse_sip_uri_matches_the_scanner(rest: str) -> None:
    assert _outcome(parse_sip_uri, "sip", rest) == _outcome(_scan_sip_uri, "sip", rest)


@given(st.one_of(uri_rests, texts))
def test_uri_key_is_contact_key_of_the_text(rest: str) -> None:
    try:
        uri = parse_uri("sip:" + rest)
    except ParseError:
        return
    assert uri_key(uri) == contact_key(str(uri))


def test_header_names_are_cached_within_a_bound(monkeypatch: Any) -> None:
    monkeypatch.setattr(message, "_NAMES", {})
    monkeypatch.setattr(message, "_MAX_NAMES", 3)
    block = "v: a\r\nVia : b\r\nX-Odd: c\r\nx-odd:d\r\nCall-ID: e\r\nCall-ID:f"
    first = message._split_header_block(block)
    assert first == message._split_header_block(block)  # the same from the cache
    assert first[:3] == [("Via", "a"), ("Via", "b"), ("X-Odd", "c")]
    assert len(message._NAMES) == 3


@settings(max_examples=200)
@given(st.sampled_from(corpus.names()), st.sampled_from(["192.0.2.99", "::1"]), st.booleans())
def test_views_stay_consistent_with_the_headers(name: str, host: str, all_first: bool) -> None:
    """Via is parsed once: the top Via from ``vias`` and ``vias`` from the top Via, and
    ``received_params`` updates the views as if the new header were parsed afresh."""
    try:
        msg = parse_message(corpus.load(name))
    except ParseError:
        return
    if not isinstance(msg, Request):
        return
    try:
        _ = msg.vias if all_first else msg.top_via
        received_params(msg, host, 5070)
        validate_request(msg)
    except ParseError:
        return
    fresh = Request(msg.method, msg.uri, msg.headers.copy(), msg.body)
    assert msg.top_via == fresh.top_via == parse_via(first_element(msg.headers.get("Via") or ""))
    assert msg.vias == fresh.vias
    assert msg.from_ == fresh.from_ and msg.to == fresh.to and msg.cseq == fresh.cseq
    assert msg.contact_addrs == fresh.contact_addrs


@given(
    st.lists(
        st.tuples(st.sampled_from(["Via", "To", "Route"]), st.sampled_from(["a", "b, c", '"x,y"'])),
        max_size=6,
    ),
    st.sampled_from(["Via", "Route"]),
)
def test_replace_first_value_is_pop_then_insert(items: list[tuple[str, str]], name: str) -> None:
    """The same values of ``name`` in the same order, and the other fields untouched (the
    new line stays where the old one was, rather than moving above other fields)."""
    one, two = Headers(list(items)), Headers(list(items))
    one.replace_first_value(name, "new")
    two.pop_first_value(name)
    two.insert_before_first(name, "new")
    assert one.get_all(name) == two.get_all(name)
    assert [i for i in one if i[0] != name] == [i for i in two if i[0] != name]


def test_ws_constant_is_what_the_regexes_assume() -> None:
    assert WS == " \t"

"""Stateful proxy request handling (RFC 3261 §16.3-§16.6, RFC 3581), without I/O."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sip.errors import BadExtension, LoopDetected, TooManyHops, UnsupportedUriScheme
from proxy.sip.forwarding import (
    DEFAULT_MAX_FORWARDS,
    DIALOG_CREATING,
    MAGIC_COOKIE,
    ProxyIdentity,
    check_loop,
    check_routable,
    forward_copy,
    loop_hash,
    make_branch,
    next_hop_uri,
    preprocess_routes,
    received_params,
)
from proxy.sip.headers import parse_name_addr
from proxy.sip.message import Request, parse_message, validate_request
from proxy.sip.uri import SipUri

ME = ProxyIdentity(
    "203.0.113.5", 5060, ("example.com",), aliases=frozenset({("proxy.example.com", 5060)})
)
UPSTREAM_VIA = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKupstream"


def request(
    method: str = "INVITE",
    ruri: str = "sip:bob@example.com",
    *,
    max_forwards: int | None = 70,
    vias: Sequence[str] = (UPSTREAM_VIA,),
    extra: Sequence[str] = (),
    to_tag: str | None = None,
    body: bytes = b"",
) -> Request:
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {ruri} SIP/2.0",
        *(f"Via: {v}" for v in vias),
        *([f"Max-Forwards: {max_forwards}"] if max_forwards is not None else []),
        f"To: {to}",
        "From: <sip:alice@example.com>;tag=alice1",
        "Call-ID: call-1@192.0.2.10",
        f"CSeq: 1 {method}",
        "Contact: <sip:alice@192.0.2.10>",
        *extra,
        f"Content-Length: {len(body)}",
    ]
    msg = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    assert isinstance(msg, Request)
    validate_request(msg)
    return msg


def forward(req: Request, target: str | None = "sip:bob@192.0.2.20:5070", **kw: object) -> Request:
    options: dict[str, object] = {
        "branch": "z9hG4bK-test-1",
        "out_transport": "udp",
        "in_transport": "udp",
        "record_route": False,
    }
    options.update(kw)
    fwd = forward_copy(req, target, ME, **options)  # type: ignore[arg-type]
    # What goes on the wire must parse back to the same request.
    again = parse_message(fwd.to_bytes())
    assert again == fwd
    return fwd


# --- ProxyIdentity -------------------------------------------------------------------------


def test_identity_recognizes_its_own_addresses() -> None:
    assert ME.is_my_address(SipUri("sip", None, "203.0.113.5", 5060))
    assert ME.is_my_address(SipUri("sip", None, "203.0.113.5"))  # default port 5060
    assert ME.is_my_address(SipUri("sip", "bob", "PROXY.example.com"))  # alias, any case
    assert not ME.is_my_address(SipUri("sip", None, "203.0.113.5", 5070))
    assert not ME.is_my_address(SipUri("sips", None, "203.0.113.5"))  # sips: 5061
    assert not ME.is_my_address(SipUri("sip", None, "example.com"))


def test_identity_is_me_and_serves() -> None:
    assert ME.is_me(SipUri("sip", None, "example.com"))  # the domain itself
    assert not ME.is_me(SipUri("sip", "bob", "example.com"))  # a user in the domain
    assert ME.serves(SipUri("sip", "bob", "EXAMPLE.COM"))
    assert not ME.serves(SipUri("sip", "bob", "elsewhere.org"))


def test_identity_record_route_and_via() -> None:
    assert ME.rr_uri("udp") == "<sip:203.0.113.5:5060;lr>"
    assert ME.rr_uri("tcp") == "<sip:203.0.113.5:5060;transport=tcp;lr>"
    assert ME.via("tcp", "z9hG4bKx") == "SIP/2.0/TCP 203.0.113.5:5060;branch=z9hG4bKx;rport"


# --- forward_copy (§16.6) ------------------------------------------------------------------


def test_forward_copy_adds_our_via_on_top() -> None:
    fwd = forward(request(), branch="z9hG4bK-abc-1", out_transport="tcp")
    top, second = fwd.vias[0], fwd.vias[1]
    assert (top.transport, top.host, top.port) == ("TCP", "203.0.113.5", 5060)
    assert top.branch == "z9hG4bK-abc-1"
    assert top.rport == ""  # we ask for rport (RFC 3581) on our own hop
    assert second.branch == "z9hG4bKupstream"
    assert len(fwd.vias) == 2


def test_forward_copy_retargets_and_keeps_the_rest() -> None:
    req = request(body=b"v=0\r\n", extra=["Content-Type: application/sdp"])
    fwd = forward(req)
    assert fwd.uri == "sip:bob@192.0.2.20:5070"
    assert fwd.ruri == SipUri("sip", "bob", "192.0.2.20", 5070)
    assert fwd.body == b"v=0\r\n"
    for name in ("From", "To", "Call-ID", "CSeq", "Contact", "Content-Type"):
        assert fwd.headers.get(name) == req.headers.get(name)


def test_forward_copy_without_target_keeps_the_request_uri() -> None:
    fwd = forward(request(ruri="sip:bob@192.0.2.99"), None)
    assert fwd.uri == "sip:bob@192.0.2.99"


def test_forward_copy_leaves_the_received_request_alone() -> None:
    req = request(max_forwards=10)
    before = req.to_bytes()
    forward(req, record_route=True, path=("<sip:edge.example.net;lr>",))
    assert req.to_bytes() == before
    assert req.max_forwards == 10


def test_each_branch_is_an_independent_copy() -> None:
    req = request()
    a = forward(req, "sip:bob@192.0.2.20", branch="z9hG4bK-h-a")
    b = forward(req, "sip:bob@192.0.2.21", branch="z9hG4bK-h-b")
    assert (a.top_via.branch, b.top_via.branch) == ("z9hG4bK-h-a", "z9hG4bK-h-b")
    assert (a.uri, b.uri) == ("sip:bob@192.0.2.20", "sip:bob@192.0.2.21")


@given(st.integers(min_value=1, max_value=255))
def test_max_forwards_is_decremented(n: int) -> None:
    assert forward(request(max_forwards=n)).max_forwards == n - 1


def test_missing_max_forwards_gets_the_default() -> None:
    fwd = forward(request(max_forwards=None))
    assert fwd.max_forwards == DEFAULT_MAX_FORWARDS == 70
    assert fwd.headers.count("Max-Forwards") == 1


def test_record_route_is_added_when_asked() -> None:
    fwd = forward(request(extra=["Record-Route: <sip:upstream.example.org;lr>"]), record_route=True)
    assert fwd.headers.values("Record-Route") == [
        "<sip:203.0.113.5:5060;lr>",
        "<sip:upstream.example.org;lr>",
    ]
    rr = parse_name_addr(fwd.headers.values("Record-Route")[0]).uri
    assert isinstance(rr, SipUri) and rr.lr  # loose routing (§16.6 step 4)
    assert ME.is_my_address(rr)


def test_no_record_route_unless_asked() -> None:
    fwd = forward(request(), record_route=False)
    assert "Record-Route" not in fwd.headers


def test_transport_change_gets_a_double_record_route() -> None:
    # The callee (TCP) uses the top entry, the caller (UDP) the bottom one.
    fwd = forward(request(), in_transport="udp", out_transport="tcp", record_route=True)
    assert fwd.headers.values("Record-Route") == [
        "<sip:203.0.113.5:5060;transport=tcp;lr>",
        "<sip:203.0.113.5:5060;lr>",
    ]


@pytest.mark.parametrize("method", ["INVITE", "SUBSCRIBE", "REFER", "NOTIFY"])
def test_dialog_creating_methods(method: str) -> None:
    assert method in DIALOG_CREATING


@pytest.mark.parametrize("method", ["REGISTER", "OPTIONS", "MESSAGE", "BYE", "ACK", "CANCEL"])
def test_methods_that_create_no_dialog(method: str) -> None:
    assert method not in DIALOG_CREATING


def test_path_becomes_routes_in_front_of_the_existing_ones() -> None:
    # RFC 3327: the Path recorded at registration routes requests to the contact.
    req = request(extra=["Route: <sip:next.example.net;lr>"])
    fwd = forward(req, path=("<sip:edge1.example.net;lr>", "<sip:edge2.example.net;lr>"))
    assert fwd.headers.values("Route") == [
        "<sip:edge1.example.net;lr>",
        "<sip:edge2.example.net;lr>",
        "<sip:next.example.net;lr>",
    ]
    assert next_hop_uri(fwd) == SipUri("sip", None, "edge1.example.net", params=(("lr", None),))


# --- check_routable (§16.3) ----------------------------------------------------------------


def test_max_forwards_zero_gets_483() -> None:
    with pytest.raises(TooManyHops) as info:
        check_routable(request(max_forwards=0))
    assert info.value.status_code == 483


@pytest.mark.parametrize("mf", [1, 70, None])
def test_max_forwards_above_zero_or_absent_is_routable(mf: int | None) -> None:
    check_routable(request(max_forwards=mf))


def test_tel_uri_is_routable() -> None:
    check_routable(request(ruri="tel:+15551234567"))


def test_unknown_scheme_gets_416() -> None:
    with pytest.raises(UnsupportedUriScheme) as info:
        check_routable(request(ruri="mailto:bob@example.com"))
    assert info.value.status_code == 416


def test_unknown_proxy_require_gets_420_naming_the_options() -> None:
    req = request(extra=["Proxy-Require: foo, bar"])
    with pytest.raises(BadExtension) as info:
        check_routable(req)
    assert info.value.status_code == 420
    assert info.value.options == ["foo", "bar"]


def test_require_is_not_the_proxys_business() -> None:
    check_routable(request(extra=["Require: 100rel"]))


# --- loops and spirals (§16.3 step 4) ------------------------------------------------------


def our_via(branch: str, port: int | None = 5060) -> str:
    host = "203.0.113.5" + (f":{port}" if port else "")
    return f"SIP/2.0/UDP {host};branch={branch}"


def test_request_back_with_our_branch_hash_is_a_loop() -> None:
    req = request()
    h = loop_hash(req)
    fwd = forward(req, None, branch=make_branch(h, "a1"))
    # The same request comes back to us (e.g. a downstream route points at us).
    back = parse_message(fwd.to_bytes())
    assert isinstance(back, Request)
    with pytest.raises(LoopDetected) as info:
        check_loop(back, ME, loop_hash(back))
    assert info.value.status_code == 482


def test_via_without_port_matches_our_default_port() -> None:
    req = request()
    h = loop_hash(req)
    looped = request(vias=[our_via(make_branch(h, "x"), port=None), UPSTREAM_VIA])
    with pytest.raises(LoopDetected):
        check_loop(looped, ME, loop_hash(looped))


def test_changed_request_uri_is_a_spiral_not_a_loop() -> None:
    req = request(ruri="sip:bob@example.com")
    branch = make_branch(loop_hash(req), "a1")
    spiral = request(ruri="sip:bob@192.0.2.20", vias=[our_via(branch), UPSTREAM_VIA])
    check_loop(spiral, ME, loop_hash(spiral))


def test_same_branch_from_another_host_is_no_loop() -> None:
    req = request()
    branch = make_branch(loop_hash(req), "a1")
    other = request(vias=[f"SIP/2.0/UDP 198.51.100.1:5060;branch={branch}", UPSTREAM_VIA])
    check_loop(other, ME, loop_hash(other))
    other_port = request(vias=[our_via(branch, port=5080), UPSTREAM_VIA])
    check_loop(other_port, ME, loop_hash(other_port))


def test_loop_hash_covers_what_identifies_the_request() -> None:
    base = loop_hash(request())
    assert loop_hash(request()) == base  # deterministic
    assert loop_hash(request(ruri="sip:carol@example.com")) != base
    assert loop_hash(request(to_tag="x")) != base
    assert loop_hash(request(extra=["Route: <sip:p.example.net;lr>"])) != base
    assert loop_hash(request(extra=["Proxy-Require: foo"])) != base
    # What every hop changes is not part of it.
    assert loop_hash(request(max_forwards=3)) == base
    assert loop_hash(request(vias=[our_via("z9hG4bKzzz"), UPSTREAM_VIA])) == base


def test_make_branch_has_the_magic_cookie() -> None:
    assert MAGIC_COOKIE == "z9hG4bK"
    assert make_branch("abc", "123") == "z9hG4bK-abc-123"


# --- Route processing (§16.4) and the next hop (§16.5/§16.6 step 6) --------------------------


def test_loose_route_naming_us_is_removed() -> None:
    req = request(extra=["Route: <sip:203.0.113.5;lr>", "Route: <sip:p2.example.net;lr>"])
    preprocess_routes(req, ME)
    assert req.headers.values("Route") == ["<sip:p2.example.net;lr>"]
    assert req.uri == "sip:bob@example.com"
    assert next_hop_uri(req) == SipUri("sip", None, "p2.example.net", params=(("lr", None),))


def test_every_leading_route_naming_us_is_removed() -> None:
    # Double Record-Route gives two entries for us in a row; an alias counts as us.
    req = request(
        extra=[
            "Route: <sip:203.0.113.5:5060;transport=tcp;lr>, <sip:proxy.example.com;lr>",
            "Route: <sip:p2.example.net;lr>, <sip:203.0.113.5;lr>",
        ]
    )
    preprocess_routes(req, ME)
    assert req.headers.values("Route") == ["<sip:p2.example.net;lr>", "<sip:203.0.113.5;lr>"]


def test_route_not_naming_us_is_kept() -> None:
    req = request(extra=["Route: <sip:p2.example.net;lr>", "Route: <sip:203.0.113.5;lr>"])
    preprocess_routes(req, ME)
    assert req.headers.values("Route") == ["<sip:p2.example.net;lr>", "<sip:203.0.113.5;lr>"]


def test_strict_router_rewrite_is_undone() -> None:
    # A strict router put our Record-Route URI into the Request-URI and moved the real
    # target to the end of the Route set.
    req = request(
        ruri="sip:203.0.113.5:5060;lr",
        extra=["Route: <sip:p2.example.net;lr>, <sip:bob@192.0.2.99:5070>"],
    )
    preprocess_routes(req, ME)
    assert req.uri == "sip:bob@192.0.2.99:5070"
    assert req.ruri == SipUri("sip", "bob", "192.0.2.99", 5070)
    assert req.headers.values("Route") == ["<sip:p2.example.net;lr>"]


def test_strict_router_rewrite_with_only_the_target_left() -> None:
    req = request(ruri="sip:203.0.113.5", extra=["Route: <sip:bob@192.0.2.99>"])
    preprocess_routes(req, ME)
    assert req.uri == "sip:bob@192.0.2.99"
    assert "Route" not in req.headers
    assert next_hop_uri(req) is None


def test_next_hop_is_none_without_route() -> None:
    assert next_hop_uri(request()) is None


def test_next_hop_of_a_non_sip_route_is_none() -> None:
    assert next_hop_uri(request(extra=["Route: <tel:+15551234567>"])) is None


# --- received / rport (RFC 3261 §18.2.1, RFC 3581) ------------------------------------------


def test_rport_is_filled_and_received_always_added() -> None:
    req = request(vias=["SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKa;rport"])
    received_params(req, "192.0.2.10", 40123)
    top = req.top_via
    assert top.rport == "40123"
    # RFC 3581 §4: received is added even when it equals the sent-by host.
    assert top.received == "192.0.2.10"
    assert top.branch == "z9hG4bKa"
    again = parse_message(req.to_bytes())
    assert again.top_via.rport == "40123"


def test_received_added_when_the_source_differs_from_sent_by() -> None:
    req = request(vias=["SIP/2.0/UDP phone.local:5060;branch=z9hG4bKa", UPSTREAM_VIA])
    received_params(req, "198.51.100.7", 5060)
    assert req.top_via.received == "198.51.100.7"
    assert req.top_via.rport is None
    assert req.vias[1].received is None  # only the top Via is ours to touch


def test_nothing_added_when_sent_by_is_right_and_no_rport() -> None:
    req = request()
    before = req.to_bytes()
    received_params(req, "192.0.2.10", 5060)
    assert req.to_bytes() == before


def test_stale_received_is_replaced() -> None:
    req = request(vias=["SIP/2.0/UDP phone.local;received=10.0.0.1;rport;branch=z9hG4bKa"])
    received_params(req, "198.51.100.7", 6000)
    top = req.top_via
    assert (top.received, top.rport) == ("198.51.100.7", "6000")
    assert [k.lower() for k, _ in top.params].count("received") == 1

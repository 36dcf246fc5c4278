"""The sans-IO registrar (RFC 3261 §10.3), driven by a manual clock.

Every test passes ``now`` explicitly: bindings carry absolute expiry times, and the 200 OK
says how many seconds each one has left at the time of the request.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.binding import Binding
from proxy.sip.errors import SipError
from proxy.sip.headers import parse_name_addr
from proxy.sip.message import Request, Response, parse_message, validate_request
from proxy.sip.registrar import (
    RegisterOutcome,
    RegistrarConfig,
    contact_key,
    ok_response,
    process_register,
    register_aor,
)

NOW = 1000.0  # not 0, so that absolute and relative times cannot be confused
AOR = "sip:alice@example.com"
SOURCE = "udp:192.0.2.10:5060"
CFG = RegistrarConfig(domains=("example.com",))


def register(
    *contacts: str,
    expires: str | None = None,
    call_id: str = "reg-1@192.0.2.10",
    cseq: int = 1,
    to: str = AOR,
    ruri: str = "sip:example.com",
    extra: Sequence[str] = (),
) -> Request:
    lines = [
        f"REGISTER {ruri} SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKreg;rport",
        "Max-Forwards: 70",
        f"To: <{to}>",
        f"From: <{to}>;tag=f00d",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *(f"Contact: {c}" for c in contacts),
        *([f"Expires: {expires}"] if expires is not None else []),
        *extra,
    ]
    msg = parse_message(("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode())
    assert isinstance(msg, Request)
    validate_request(msg)
    return msg


def apply(
    req: Request,
    current: Sequence[Binding] = (),
    now: float = NOW,
    config: RegistrarConfig = CFG,
    *,
    source: str = SOURCE,
    addressed_to_me: bool = False,
) -> RegisterOutcome:
    return process_register(
        req,
        current,
        now,
        config,
        source=source,
        to_tag="regtag",
        addressed_to_me=addressed_to_me,
    )


def listed(resp: Response) -> dict[str, tuple[int, str | None]]:
    """Contact URI -> (expires, q) as the 200 OK lists them."""
    out: dict[str, tuple[int, str | None]] = {}
    for value in resp.headers.values("Contact"):
        na = parse_name_addr(value)
        expires = na.param("expires")
        assert expires is not None, f"binding listed without expires: {value}"
        out[str(na.uri)] = (int(expires), na.param("q"))
    return out


def listed_order(resp: Response) -> list[str]:
    return [str(parse_name_addr(v).uri) for v in resp.headers.values("Contact")]


def bindings_of(outcome: RegisterOutcome) -> dict[str, Binding]:
    assert outcome.bindings is not None, "expected the binding set to change"
    return {b.contact: b for b in outcome.bindings}


# --- adding bindings and their expiry ----------------------------------------------------


def test_first_register_binds_every_contact_of_the_aor() -> None:
    out = apply(register("<sip:alice@192.0.2.10:5060>", "<sip:alice@198.51.100.7>"))
    assert out.response.status == 200
    assert out.aor == AOR
    bound = bindings_of(out)
    assert set(bound) == {"sip:alice@192.0.2.10:5060", "sip:alice@198.51.100.7"}
    for b in bound.values():
        assert b.aor == AOR
        assert b.source == SOURCE
        assert b.call_id == "reg-1@192.0.2.10"
        assert b.cseq == 1
        assert b.registered_at == NOW
    assert set(listed(out.response)) == set(bound)


def test_to_tag_is_added_to_the_200() -> None:
    out = apply(register("<sip:alice@192.0.2.10>"))
    assert out.response.to.tag == "regtag"
    assert out.response.call_id == "reg-1@192.0.2.10"
    assert str(out.response.cseq) == "1 REGISTER"


def test_expiry_is_absolute_and_added_exactly_once() -> None:
    # A binding registered for 3600 s at t=1000 expires at exactly 4600.
    out = apply(register("<sip:alice@192.0.2.10>", expires="3600"), now=1000.0)
    (b,) = out.bindings or ()
    assert b.expires_at == 4600.0
    assert listed(out.response)["sip:alice@192.0.2.10"][0] == 3600
    # Seen from later, the remaining time shrinks by exactly the elapsed time.
    assert b.remaining(1000.0 + 600) == 3000
    assert b.is_live(4599.9) and not b.is_live(4600.0)


def test_refresh_restarts_the_interval_from_now() -> None:
    first = apply(register("<sip:alice@192.0.2.10>", expires="3600", cseq=1), now=NOW)
    later = NOW + 1800
    second = apply(
        register("<sip:alice@192.0.2.10>", expires="3600", cseq=2), first.bindings or (), later
    )
    (b,) = second.bindings or ()
    assert b.expires_at == later + 3600  # not NOW + 3600 + 3600, not NOW + 3600
    assert b.registered_at == NOW  # the first registration time is kept
    assert b.cseq == 2
    assert listed(second.response)["sip:alice@192.0.2.10"][0] == 3600


def test_no_expiry_given_means_the_default() -> None:
    cfg = RegistrarConfig(domains=("example.com",), default_expires=1234)
    out = apply(register("<sip:alice@192.0.2.10>"), config=cfg)
    (b,) = out.bindings or ()
    assert b.expires_at == NOW + 1234


def test_expires_header_applies_to_contacts_without_their_own() -> None:
    out = apply(register("<sip:a@192.0.2.10>", "<sip:b@192.0.2.10>", expires="300"))
    assert {c: b.expires_at for c, b in bindings_of(out).items()} == {
        "sip:a@192.0.2.10": NOW + 300,
        "sip:b@192.0.2.10": NOW + 300,
    }


def test_contact_expires_param_wins_over_the_header() -> None:
    # §10.3 step 7: the contact's own "expires" parameter, then the Expires header.
    out = apply(
        register("<sip:a@192.0.2.10>;expires=120", "<sip:b@192.0.2.10>", expires="900"),
    )
    bound = bindings_of(out)
    assert bound["sip:a@192.0.2.10"].expires_at == NOW + 120
    assert bound["sip:b@192.0.2.10"].expires_at == NOW + 900
    assert listed(out.response) == {
        "sip:a@192.0.2.10": (120, None),
        "sip:b@192.0.2.10": (900, None),
    }


def test_expires_param_on_an_addr_spec_contact_is_a_header_param() -> None:
    # Without <>, ";expires=" belongs to the header field, not the URI (RFC 3261 §20).
    out = apply(register("sip:a@192.0.2.10;expires=200", expires="900"))
    bound = bindings_of(out)
    assert set(bound) == {"sip:a@192.0.2.10"}
    assert bound["sip:a@192.0.2.10"].expires_at == NOW + 200


def test_malformed_contact_expires_param_is_refused_not_replaced() -> None:
    # Not the header's 400 s, nor 3600 s: the phone is told (tests/sip/test_bad_input.py).
    out = apply(register("<sip:a@192.0.2.10>;expires=soon", expires="400"))
    assert out.response.status == 400
    assert not out.changed


@pytest.mark.parametrize(
    ("header", "param"),
    [("86400", None), (None, "86400"), ("99999999999999999999", None)],
)
def test_long_requests_are_clamped_to_max_expires(header: str | None, param: str | None) -> None:
    cfg = RegistrarConfig(domains=("example.com",), max_expires=7200)
    contact = "<sip:a@192.0.2.10>" + (f";expires={param}" if param else "")
    out = apply(register(contact, expires=header), config=cfg)
    assert bindings_of(out)["sip:a@192.0.2.10"].expires_at == NOW + 7200
    assert listed(out.response)["sip:a@192.0.2.10"][0] == 7200


@pytest.mark.parametrize(
    ("contact", "header"),
    [("<sip:a@192.0.2.10>", "59"), ("<sip:a@192.0.2.10>;expires=1", "3600")],
)
def test_too_brief_gets_423_with_min_expires(contact: str, header: str) -> None:
    cfg = RegistrarConfig(domains=("example.com",), min_expires=60)
    out = apply(register(contact, expires=header), config=cfg)
    assert out.response.status == 423
    assert out.response.headers.get("Min-Expires") == "60"
    assert not out.changed


def test_exactly_min_expires_is_accepted() -> None:
    cfg = RegistrarConfig(domains=("example.com",), min_expires=60)
    out = apply(register("<sip:a@192.0.2.10>", expires="60"), config=cfg)
    assert out.response.status == 200
    assert bindings_of(out)["sip:a@192.0.2.10"].expires_at == NOW + 60


def test_one_brief_contact_rejects_the_whole_request() -> None:
    current = apply(register("<sip:a@192.0.2.10>")).bindings or ()
    out = apply(register("<sip:b@192.0.2.10>", "<sip:c@192.0.2.10>;expires=5", cseq=2), current)
    assert out.response.status == 423
    assert not out.changed


@settings(max_examples=200, deadline=None)
@given(
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False).map(round),
    expires=st.integers(min_value=0, max_value=2**32),
    in_param=st.booleans(),
)
def test_expiry_arithmetic(now: float, expires: int, in_param: bool) -> None:
    cfg = RegistrarConfig(domains=("example.com",), min_expires=60, max_expires=7200)
    contact = "<sip:a@192.0.2.10>" + (f";expires={expires}" if in_param else "")
    out = apply(register(contact, expires=None if in_param else str(expires)), (), now, cfg)
    if expires == 0:
        assert out.response.status == 200 and not out.changed
    elif expires < 60:
        assert out.response.status == 423
        assert out.response.headers.get("Min-Expires") == "60"
    else:
        granted = min(expires, 7200)
        (b,) = out.bindings or ()
        assert b.expires_at == now + granted
        assert listed(out.response)["sip:a@192.0.2.10"][0] == granted


# --- several contacts, refreshing and removing ---------------------------------------------


def test_a_second_phone_adds_to_the_existing_bindings() -> None:
    desk = apply(register("<sip:alice@192.0.2.10>", call_id="desk", expires="3600"))
    mobile = apply(
        register("<sip:alice@198.51.100.7>", call_id="mobile", expires="600"),
        desk.bindings or (),
        NOW + 100,
        source="tcp:198.51.100.7:40000",
    )
    bound = bindings_of(mobile)
    assert set(bound) == {"sip:alice@192.0.2.10", "sip:alice@198.51.100.7"}
    assert bound["sip:alice@192.0.2.10"].source == SOURCE  # untouched
    assert bound["sip:alice@198.51.100.7"].source == "tcp:198.51.100.7:40000"
    # The 200 lists every binding of the AOR, with what is left of each at this time.
    assert listed(mobile.response) == {
        "sip:alice@192.0.2.10": (3500, None),
        "sip:alice@198.51.100.7": (600, None),
    }


def test_register_without_contact_fetches_the_bindings() -> None:
    current = apply(register("<sip:a@192.0.2.10>", "<sip:b@192.0.2.10>;expires=120")).bindings
    assert current is not None
    out = apply(register(cseq=2), current, NOW + 20)
    assert out.response.status == 200
    assert not out.changed  # a query changes nothing
    assert listed(out.response) == {
        "sip:a@192.0.2.10": (3600 - 20, None),
        "sip:b@192.0.2.10": (100, None),
    }


def test_query_of_an_aor_without_bindings_lists_nothing() -> None:
    out = apply(register())
    assert out.response.status == 200
    assert out.response.headers.values("Contact") == []


def test_expires_zero_removes_one_binding() -> None:
    current = apply(register("<sip:a@192.0.2.10>", "<sip:b@192.0.2.10>")).bindings or ()
    out = apply(register("<sip:a@192.0.2.10>;expires=0", cseq=2), current, NOW + 10)
    assert set(bindings_of(out)) == {"sip:b@192.0.2.10"}
    assert set(listed(out.response)) == {"sip:b@192.0.2.10"}


def test_expires_header_zero_removes_the_listed_contacts() -> None:
    current = apply(register("<sip:a@192.0.2.10>", "<sip:b@192.0.2.10>")).bindings or ()
    out = apply(register("<sip:b@192.0.2.10>", expires="0", cseq=2), current)
    assert set(bindings_of(out)) == {"sip:a@192.0.2.10"}


def test_removing_an_unknown_contact_changes_nothing() -> None:
    current = apply(register("<sip:a@192.0.2.10>")).bindings or ()
    out = apply(register("<sip:zz@192.0.2.10>;expires=0", cseq=2), current)
    assert out.response.status == 200
    assert not out.changed
    assert set(listed(out.response)) == {"sip:a@192.0.2.10"}


def test_contact_matching_ignores_scheme_and_host_case() -> None:
    current = apply(register("<sip:alice@Phone.Example.COM:5060>")).bindings or ()
    out = apply(register("<SIP:alice@phone.example.com:5060>;expires=0", cseq=2), current)
    assert bindings_of(out) == {}


def test_contact_key() -> None:
    assert contact_key("sip:alice@HOST.example") == contact_key("SIP:alice@host.example")
    assert contact_key("sip:Alice@host.example") != contact_key("sip:alice@host.example")
    assert contact_key("sip:a@h;transport=tcp") != contact_key("sip:a@h")
    assert contact_key("sip:a@h:5070") != contact_key("sip:a@h")
    # Not a URI the parser knows: compared as written.
    assert contact_key("not a uri") == "not a uri"


# --- Contact: * ----------------------------------------------------------------------------


def test_star_with_expires_zero_removes_every_binding() -> None:
    current = apply(register("<sip:a@192.0.2.10>", "<sip:b@192.0.2.10>")).bindings or ()
    out = apply(register("*", expires="0", cseq=2), current, NOW + 5)
    assert out.response.status == 200
    assert out.bindings == ()
    assert out.response.headers.values("Contact") == []


def test_star_from_another_call_id_removes_every_binding() -> None:
    current = apply(register("<sip:a@192.0.2.10>", cseq=50)).bindings or ()
    out = apply(register("*", expires="0", call_id="other", cseq=1), current)
    assert out.response.status == 200
    assert out.bindings == ()


@pytest.mark.parametrize(
    ("contacts", "expires"),
    [
        (["*"], "3600"),
        (["*"], None),
        (["*", "<sip:a@192.0.2.10>"], "0"),
    ],
)
def test_star_needs_expires_zero_and_no_other_contact(
    contacts: list[str], expires: str | None
) -> None:
    current = apply(register("<sip:a@192.0.2.10>")).bindings or ()
    out = apply(register(*contacts, expires=expires, cseq=2), current)
    assert out.response.status == 400  # §10.3 step 6
    assert not out.changed


# --- Call-ID and CSeq ordering (§10.3 step 7) ----------------------------------------------


@pytest.mark.parametrize("cseq", [5, 4, 1])
def test_same_call_id_with_old_cseq_is_rejected_with_500(cseq: int) -> None:
    current = apply(register("<sip:a@192.0.2.10>", cseq=5, expires="3600")).bindings or ()
    out = apply(register("<sip:a@192.0.2.10>", cseq=cseq, expires="60"), current, NOW + 10)
    assert out.response.status == 500
    assert not out.changed


def test_out_of_order_removal_is_rejected_and_the_binding_kept() -> None:
    current = apply(register("<sip:a@192.0.2.10>", cseq=5)).bindings or ()
    out = apply(register("<sip:a@192.0.2.10>;expires=0", cseq=4), current)
    assert out.response.status == 500
    assert not out.changed


def test_out_of_order_star_is_rejected_with_500() -> None:
    current = apply(register("<sip:a@192.0.2.10>", cseq=5)).bindings or ()
    out = apply(register("*", expires="0", cseq=5), current)
    assert out.response.status == 500
    assert not out.changed


def test_same_call_id_with_higher_cseq_updates() -> None:
    current = apply(register("<sip:a@192.0.2.10>", cseq=5)).bindings or ()
    out = apply(register("<sip:a@192.0.2.10>", cseq=6, expires="120"), current, NOW + 10)
    (b,) = out.bindings or ()
    assert (b.cseq, b.expires_at) == (6, NOW + 10 + 120)


def test_different_call_id_replaces_whatever_its_cseq() -> None:
    current = apply(register("<sip:a@192.0.2.10>", call_id="before-reboot", cseq=900)).bindings
    out = apply(
        register("<sip:a@192.0.2.10>", call_id="after-reboot", cseq=1, expires="300"),
        current or (),
        NOW + 10,
    )
    (b,) = out.bindings or ()
    assert (b.call_id, b.cseq, b.expires_at) == ("after-reboot", 1, NOW + 10 + 300)


def test_cseq_of_another_contact_does_not_matter() -> None:
    # Ordering is per binding: a new contact with a lower CSeq is still a new binding.
    current = apply(register("<sip:a@192.0.2.10>", cseq=5)).bindings or ()
    out = apply(register("<sip:b@192.0.2.10>", call_id="other-phone", cseq=1), current)
    assert set(bindings_of(out)) == {"sip:a@192.0.2.10", "sip:b@192.0.2.10"}


# --- q-values -------------------------------------------------------------------------------


def test_the_200_lists_bindings_by_descending_q() -> None:
    out = apply(
        register(
            "<sip:low@192.0.2.10>;q=0.1",
            "<sip:none@192.0.2.10>",
            "<sip:mid@192.0.2.10>;q=0.5",
            "<sip:top@192.0.2.10>;q=1.0",
        )
    )
    order = listed_order(out.response)
    assert order.index("sip:mid@192.0.2.10") < order.index("sip:low@192.0.2.10")
    assert order[-1] == "sip:low@192.0.2.10"
    assert set(order[:2]) == {"sip:none@192.0.2.10", "sip:top@192.0.2.10"}  # both q=1
    qs = {c: q for c, (_, q) in listed(out.response).items()}
    assert qs["sip:low@192.0.2.10"] == "0.1"
    assert qs["sip:mid@192.0.2.10"] == "0.5"
    assert bindings_of(out)["sip:mid@192.0.2.10"].q == 0.5
    assert bindings_of(out)["sip:none@192.0.2.10"].q == 1.0


@pytest.mark.parametrize("q", ["0", "0.5", "0.001", "1", "1.0", "1.000", "0.", "1."])
def test_valid_q_values(q: str) -> None:
    out = apply(register(f"<sip:a@192.0.2.10>;q={q}"))
    assert out.response.status == 200
    assert bindings_of(out)["sip:a@192.0.2.10"].q == float(q)


@pytest.mark.parametrize(
    "q", ["1.5", "2", "-0.5", "1.001", "0.1234", ".5", "01", "nan", "inf", "0.5e0", "+0.5", "x"]
)
def test_invalid_q_values_get_400(q: str) -> None:
    # RFC 3261 §25.1: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
    out = apply(register(f"<sip:a@192.0.2.10>;q={q}"))
    assert out.response.status == 400
    assert not out.changed


# --- which AORs this registrar serves (§10.3 steps 1 and 5) ----------------------------------


def test_request_uri_of_another_domain_gets_403() -> None:
    out = apply(register("<sip:a@192.0.2.10>", ruri="sip:elsewhere.org"))
    assert out.response.status == 403
    assert not out.changed


def test_to_of_another_domain_gets_404() -> None:
    out = apply(register("<sip:a@192.0.2.10>", to="sip:alice@elsewhere.org"))
    assert out.response.status == 404


def test_to_without_user_gets_404() -> None:
    out = apply(register("<sip:a@192.0.2.10>", to="sip:example.com"))
    assert out.response.status == 404


def test_domains_are_matched_without_case() -> None:
    out = apply(register("<sip:a@192.0.2.10>", ruri="sip:EXAMPLE.com", to="sip:alice@Example.COM"))
    assert out.response.status == 200
    assert out.aor == AOR


def test_registrar_addressed_by_its_own_ip_judges_by_to_alone() -> None:
    req = register("<sip:a@192.0.2.10>", ruri="sip:203.0.113.5:5060")
    assert apply(req).response.status == 403
    out = apply(req, addressed_to_me=True)
    assert out.response.status == 200
    assert out.aor == AOR
    req = register("<sip:a@192.0.2.10>", ruri="sip:203.0.113.5:5060", to="sip:bob@other.org")
    assert apply(req, addressed_to_me=True).response.status == 404


def test_empty_domain_list_serves_any_domain() -> None:
    out = apply(
        register("<sip:a@192.0.2.10>", ruri="sip:anything.test", to="sip:bob@anything.test"),
        config=RegistrarConfig(),
    )
    assert out.response.status == 200
    assert out.aor == "sip:bob@anything.test"


def test_register_aor_normalizes_the_to_uri() -> None:
    req = register(to="sip:alice@EXAMPLE.COM:5070;transport=tcp")
    assert register_aor(req, CFG) == AOR
    with pytest.raises(SipError) as info:
        register_aor(register(ruri="sip:elsewhere.org"), CFG)
    assert info.value.status_code == 403


# --- max_contacts ------------------------------------------------------------------------


def test_more_contacts_than_max_contacts_in_one_request() -> None:
    cfg = RegistrarConfig(domains=("example.com",), max_contacts=3)
    out = apply(register(*(f"<sip:p{i}@192.0.2.10>" for i in range(4))), config=cfg)
    assert out.response.status == 403
    assert not out.changed


def test_max_contacts_counts_the_existing_bindings() -> None:
    cfg = RegistrarConfig(domains=("example.com",), max_contacts=3)
    contacts = [f"<sip:p{i}@192.0.2.10>" for i in range(3)]
    current = apply(register(*contacts), config=cfg).bindings or ()
    assert len(current) == 3
    # A refresh of the same three is fine; a fourth is not.
    assert apply(register(*contacts, cseq=2), current, config=cfg).response.status == 200
    out = apply(register("<sip:p9@192.0.2.10>", cseq=2), current, config=cfg)
    assert out.response.status == 403
    # Swapping one out for another in the same request stays within the limit.
    out = apply(
        register("<sip:p0@192.0.2.10>;expires=0", "<sip:p9@192.0.2.10>", cseq=2),
        current,
        config=cfg,
    )
    assert set(bindings_of(out)) == {f"sip:p{i}@192.0.2.10" for i in (1, 2, 9)}


# --- RFC 5626 instance and reg-id, RFC 3327 Path --------------------------------------------

INSTANCE = '"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'


def test_same_instance_and_reg_id_replaces_the_old_flow() -> None:
    first = apply(
        register(f"<sip:alice@192.0.2.10:5060>;+sip.instance={INSTANCE};reg-id=1", cseq=1)
    )
    (b,) = first.bindings or ()
    assert (b.instance, b.reg_id) == (INSTANCE, 1)
    # After a NAT rebinding the phone registers a new contact for the same flow.
    second = apply(
        register(
            f"<sip:alice@192.0.2.10:6000>;+sip.instance={INSTANCE};reg-id=1",
            call_id="new-call-id",
        ),
        first.bindings or (),
        NOW + 30,
    )
    assert set(bindings_of(second)) == {"sip:alice@192.0.2.10:6000"}
    assert set(listed(second.response)) == {"sip:alice@192.0.2.10:6000"}


def test_other_reg_id_is_another_flow() -> None:
    first = apply(register(f"<sip:alice@192.0.2.10:5060>;+sip.instance={INSTANCE};reg-id=1"))
    second = apply(
        register(f"<sip:alice@198.51.100.7:5060>;+sip.instance={INSTANCE};reg-id=2", cseq=2),
        first.bindings or (),
    )
    assert set(bindings_of(second)) == {"sip:alice@192.0.2.10:5060", "sip:alice@198.51.100.7:5060"}


def test_instance_replacement_still_checks_cseq() -> None:
    first = apply(
        register(f"<sip:alice@192.0.2.10:5060>;+sip.instance={INSTANCE};reg-id=1", cseq=7)
    )
    out = apply(
        register(f"<sip:alice@192.0.2.10:6000>;+sip.instance={INSTANCE};reg-id=1", cseq=3),
        first.bindings or (),
    )
    assert out.response.status == 500
    assert not out.changed


@pytest.mark.parametrize("reg_id", ["x", "-1", "12345678901"])
def test_malformed_reg_id_gets_400(reg_id: str) -> None:
    out = apply(register(f"<sip:alice@192.0.2.10>;+sip.instance={INSTANCE};reg-id={reg_id}"))
    assert out.response.status == 400


def test_path_is_stored_with_the_binding() -> None:
    out = apply(
        register(
            "<sip:alice@192.0.2.10>",
            extra=["Path: <sip:edge1.example.net;lr>", "Path: <sip:edge2.example.net;lr>"],
        )
    )
    (b,) = out.bindings or ()
    assert b.path == ("<sip:edge1.example.net;lr>", "<sip:edge2.example.net;lr>")


# --- RFC 5626 outbound ---------------------------------------------------------------------

OB_CONTACT = f"<sip:alice@192.0.2.10:5060;ob>;+sip.instance={INSTANCE};reg-id=1"
SUPPORTED = "Supported: path, outbound"


def test_outbound_register_gets_require_outbound_flow_timer_and_its_contact_echoed() -> None:
    cfg = RegistrarConfig(domains=("example.com",), flow_timer_udp=45, flow_timer_stream=500)
    out = apply(register(OB_CONTACT, extra=[SUPPORTED]), config=cfg)
    resp = out.response
    assert resp.status == 200
    assert resp.headers.values("Require") == ["outbound"]
    assert resp.headers.get("Flow-Timer") == "45"  # the flow is UDP
    (contact,) = resp.headers.values("Contact")
    na = parse_name_addr(contact)
    assert (na.param("+sip.instance"), na.param("reg-id")) == (INSTANCE, "1")
    assert out.outbound == "sip:alice@192.0.2.10:5060;ob"
    # Over TCP the Flow-Timer is the stream one (kept under the idle timeout).
    tcp = apply(register(OB_CONTACT, extra=[SUPPORTED]), config=cfg, source="tcp:192.0.2.10:4711")
    assert tcp.response.headers.get("Flow-Timer") == "500"


@pytest.mark.parametrize(
    ("contact", "extra"),
    [
        (OB_CONTACT, []),  # no Supported: outbound: the reg-id only names the binding
        (f"<sip:alice@192.0.2.10:5060>;+sip.instance={INSTANCE}", [SUPPORTED]),  # no reg-id
        ("<sip:alice@192.0.2.10:5060>;reg-id=1", [SUPPORTED]),  # no instance
    ],
)
def test_register_without_everything_outbound_needs_is_a_plain_one(
    contact: str, extra: list[str]
) -> None:
    out = apply(register(contact, extra=extra))
    assert out.response.status == 200
    assert "Require" not in out.response.headers
    assert "Flow-Timer" not in out.response.headers
    assert out.outbound is None
    assert out.changed


def test_an_outbound_refresh_is_outbound_again_and_a_removal_is_not() -> None:
    first = apply(register(OB_CONTACT, extra=[SUPPORTED]))
    again = apply(register(OB_CONTACT, extra=[SUPPORTED], cseq=2), first.bindings or ())
    assert again.outbound == "sip:alice@192.0.2.10:5060;ob"
    gone = apply(register(OB_CONTACT, expires="0", extra=[SUPPORTED], cseq=3), again.bindings or ())
    assert gone.bindings == ()
    assert gone.outbound is None
    assert "Require" not in gone.response.headers


def test_two_outbound_contacts_in_one_register_get_400() -> None:
    other = f"<sip:alice@192.0.2.10:5062>;+sip.instance={INSTANCE};reg-id=2"
    out = apply(register(OB_CONTACT, other, extra=[SUPPORTED]))
    assert out.response.status == 400
    assert not out.changed


def test_outbound_through_a_proxy_needs_ob_in_the_first_path() -> None:
    # RFC 5626 §6: the first hop must say it keeps the flow.
    hop = "Via: SIP/2.0/UDP edge.example.net;branch=z9hG4bKedge"
    plain = apply(register(OB_CONTACT, extra=[SUPPORTED, "Path: <sip:edge.example.net;lr>"]))
    assert plain.response.status == 439
    assert plain.response.reason == "First Hop Lacks Outbound Support"
    no_path = apply(register(OB_CONTACT, extra=[SUPPORTED, hop]))
    assert no_path.response.status == 439
    ob = apply(register(OB_CONTACT, extra=[SUPPORTED, "Path: <sip:edge.example.net;lr;ob>"]))
    assert ob.response.status == 200
    assert ob.response.headers.values("Require") == ["outbound"]


def test_a_query_lists_instance_and_reg_id_but_requires_nothing() -> None:
    first = apply(register(OB_CONTACT, extra=[SUPPORTED]))
    query = apply(register(extra=[SUPPORTED], cseq=2), first.bindings or ())
    assert not query.changed
    assert "Require" not in query.response.headers
    (contact,) = query.response.headers.values("Contact")
    assert parse_name_addr(contact).param("reg-id") == "1"


# --- ok_response --------------------------------------------------------------------------


def test_ok_response_lists_remaining_time_of_each_binding() -> None:
    bindings = [
        Binding(AOR, "sip:a@192.0.2.10", expires_at=NOW + 3600),
        Binding(AOR, "sip:b@192.0.2.10", expires_at=NOW + 90.4, q=0.7),
    ]
    req = register()
    resp = ok_response(req, bindings, NOW + 60, "t1")
    assert resp.status == 200
    assert resp.to.tag == "t1"
    assert listed(resp) == {"sip:a@192.0.2.10": (3540, None), "sip:b@192.0.2.10": (30, "0.7")}
    # A binding that ran out while the request was handled is listed with 0, never < 0.
    resp = ok_response(req, bindings, NOW + 100, "t1")
    assert listed(resp)["sip:b@192.0.2.10"] == (0, "0.7")


# --- a model of the binding set ------------------------------------------------------------

_contact_ids = st.integers(min_value=0, max_value=4)
_ops = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2000),  # seconds since the previous request
        st.lists(
            st.tuples(_contact_ids, st.sampled_from([0, 60, 300, 3600, 100000])),
            min_size=0,
            max_size=3,
            unique_by=lambda t: t[0],
        ),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_registrar_matches_a_simple_model(ops: list[tuple[int, list[tuple[int, int]]]]) -> None:
    """Contact i -> absolute expiry, after any sequence of in-order REGISTERs from one phone."""
    cfg = RegistrarConfig(domains=("example.com",), min_expires=60, max_expires=7200)
    now = NOW
    store: tuple[Binding, ...] = ()
    model: dict[str, float] = {}
    for cseq, (elapsed, updates) in enumerate(ops, start=1):
        now += elapsed
        live = tuple(b for b in store if b.is_live(now))
        model = {c: t for c, t in model.items() if t > now}
        contacts = [f"<sip:p{i}@192.0.2.10>;expires={e}" for i, e in updates]
        out = apply(register(*contacts, cseq=cseq), live, now, cfg)
        assert out.response.status == 200
        for i, e in updates:
            if e == 0:
                model.pop(f"sip:p{i}@192.0.2.10", None)
            else:
                model[f"sip:p{i}@192.0.2.10"] = now + min(e, 7200)
        store = out.bindings if out.bindings is not None else live
        assert {b.contact: b.expires_at for b in store} == model
        assert {c: e for c, (e, _) in listed(out.response).items()} == {
            c: round(t - now) for c, t in model.items()
        }

"""The relay policy, tested by attacking: every request below tries to make the site send
something to a host it does not serve. Each must be challenged or refused, and the
"outside" host (a socket on another loopback address) must receive nothing at all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.sip.message import Request, parse_message
from proxy.site import Site

from .conftest import DOMAIN, sip, start_site
from .ua import Endpoint

OUTSIDE = "127.0.0.5"
ATTACKER = "127.0.0.7"
QUIET = 0.4  # seconds the outside host listens after the answer


async def nothing_arrives(target: Endpoint) -> None:
    await asyncio.sleep(QUIET)
    assert target.received == [], [r[:60] for r in target.received]


def outside_uri(target: Endpoint, user: str = "victim") -> str:
    return f"sip:{user}@{target.host}:{target.port}"


# (method, how the attacker writes the request); {out} is the outside host's URI,
# {proxy} the site's own address.
ATTACKS: list[tuple[str, dict[str, Any]]] = [
    ("INVITE", {"ruri": "{out}", "from_": "sip:mallory@evil.test"}),
    ("INVITE", {"ruri": "{out}", "from_": f"sip:alice@{DOMAIN}"}),
    ("INVITE", {"ruri": "{out}", "from_": f"sip:alice@{DOMAIN}."}),
    ("INVITE", {"ruri": "{out}", "from_": "sip:alice@127.0.0.1"}),
    ("INVITE", {"ruri": "{out}", "from_": "tel:+15551234"}),
    # A preloaded Route to the outside host, with a Request-URI that is local.
    ("INVITE", {"ruri": f"sip:bob@{DOMAIN}", "from_": "sip:mallory@evil.test",
                "extra": ("Route: <{out};lr>",)}),
    # A made-up To tag: the request poses as in-dialog.
    ("INVITE", {"ruri": "{out}", "from_": "sip:mallory@evil.test", "to_tag": "x1"}),
    # ... and routes itself through us with a Route naming the proxy (no dialog token).
    ("INVITE", {"ruri": "{out}", "from_": "sip:mallory@evil.test", "to_tag": "x1",
                "extra": ("Route: <sip:{proxy};lr>",)}),
    # ... with a dialog token it made up.
    ("BYE", {"ruri": "{out}", "from_": "sip:mallory@evil.test", "to_tag": "x1",
             "extra": ("Route: <sip:{proxy};lr;p2d=0123456789abcdef>",)}),
    # The site-to-site marker: it only ever reaches local users.
    ("INVITE", {"ruri": "{out};p2psip=home", "from_": f"sip:alice@{DOMAIN}"}),
    ("INVITE", {"ruri": f"sip:bob@{DOMAIN};p2psip=home", "from_": "sip:mallory@evil.test",
                "extra": ("Route: <{out};lr>",)}),
    # Methods that were never challenged.
    ("BYE", {"ruri": "{out}", "from_": "sip:mallory@evil.test", "to_tag": "x2"}),
    ("INFO", {"ruri": "{out}", "from_": "sip:mallory@evil.test", "to_tag": "x3"}),
    ("NOTIFY", {"ruri": "{out}", "from_": "sip:mallory@evil.test", "to_tag": "x4",
                "extra": ("Event: presence",)}),
    ("OPTIONS", {"ruri": "{out}", "from_": "sip:mallory@evil.test"}),
    ("PUBLISH", {"ruri": "{out}", "from_": "sip:mallory@evil.test",
                 "extra": ("Event: presence",)}),
    ("MESSAGE", {"ruri": "{out}", "from_": f"sip:bob@{DOMAIN}"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "how"), ATTACKS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(ATTACKS)]
)
async def test_relay_attempts_are_challenged_and_reach_nothing(
    site: Site, endpoints: Callable[..., Any], method: str, how: dict[str, Any]
) -> None:
    target = await endpoints(OUTSIDE)
    attacker = sip(await endpoints(ATTACKER), site)
    out, proxy = outside_uri(target), f"127.0.0.1:{site.sip_port}"
    how = dict(how)
    how["ruri"] = how["ruri"].format(out=out, proxy=proxy)
    how["extra"] = tuple(e.format(out=out, proxy=proxy) for e in how.get("extra", ()))
    resp = await attacker.request(method, **how)
    assert resp.status in (403, 407), (resp.status, resp.reason)
    await nothing_arrives(target)


async def test_a_site_without_users_relays_for_nobody(
    tmp_path: Path, endpoints: Callable[..., Any]
) -> None:
    site = await start_site(tmp_path, users=False)
    try:
        target = await endpoints(OUTSIDE)
        attacker = sip(await endpoints(ATTACKER), site)
        resp = await attacker.request("INVITE", outside_uri(target), from_="sip:a@evil.test")
        assert resp.status == 403
        await nothing_arrives(target)
    finally:
        await site.close()


async def test_an_authenticated_user_relays_as_themself_with_an_asserted_identity(
    site: Site, endpoints: Callable[..., Any]
) -> None:
    target = await endpoints(OUTSIDE)
    alice = sip(await endpoints(ATTACKER), site)
    resp = await alice.request(
        "INVITE", outside_uri(target), from_=f"sip:alice@{DOMAIN}", password="wonderland",
        extra=("P-Asserted-Identity: <sip:bob@example.com>",),
    )  # fmt: skip
    assert resp.status == 486  # the outside host's answer came back
    (invite,) = [r for r in target.requests() if r.method == "INVITE"]
    assert invite.headers.values("P-Asserted-Identity") == [f"<sip:alice@{DOMAIN}>"]
    assert "Proxy-Authorization" not in invite.headers


async def test_an_authenticated_user_cannot_send_as_another_user(
    site: Site, endpoints: Callable[..., Any]
) -> None:
    target = await endpoints(OUTSIDE)
    alice = sip(await endpoints(ATTACKER), site)
    resp = await alice.request(
        "INVITE", outside_uri(target), from_=f"sip:bob@{DOMAIN}",
        username="alice", password="wonderland",
    )  # fmt: skip
    assert resp.status == 403
    await nothing_arrives(target)
    assert site.counters.identity_mismatch == 1


async def test_a_made_up_response_is_not_reflected(
    site: Site, endpoints: Callable[..., Any]
) -> None:
    target = await endpoints(OUTSIDE)
    attacker = await endpoints(ATTACKER)
    me = site.identity
    for status, method, branch in (
        (200, "INVITE", "z9hG4bK-0123456789ab-deadbeefcafe00000000"),
        (200, "INVITE", "z9hG4bKanything"),
        (486, "INVITE", "z9hG4bK-0123456789ab-deadbeefcafe00000000"),
        (200, "OPTIONS", "z9hG4bK-0123456789ab-deadbeefcafe00000000"),
    ):
        response = (
            f"SIP/2.0 {status} X\r\n"
            f"Via: SIP/2.0/UDP {me.host}:{me.port};branch={branch}\r\n"
            f"Via: SIP/2.0/UDP {target.host}:{target.port};branch=z9hG4bKvictim\r\n"
            "From: <sip:a@evil.test>;tag=1\r\nTo: <sip:b@evil.test>;tag=2\r\n"
            f"Call-ID: reflect-{status}-{method}\r\nCSeq: 1 {method}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        attacker.sendto(response, "127.0.0.1", site.sip_port)
    await nothing_arrives(target)


async def test_an_anonymous_caller_cannot_assert_an_identity(
    site: Site, endpoints: Callable[..., Any]
) -> None:
    bob_phone = await endpoints("127.0.0.1")
    bob = sip(bob_phone, site)
    assert (await bob.request(
        "REGISTER", f"sip:{DOMAIN}", from_=f"sip:bob@{DOMAIN}", to=f"sip:bob@{DOMAIN}",
        password="builder",
    )).status == 200  # fmt: skip
    mallory = sip(await endpoints(ATTACKER), site)
    resp = await mallory.request(
        "INVITE", f"sip:bob@{DOMAIN}", from_="sip:mallory@evil.test",
        extra=("P-Asserted-Identity: <sip:alice@example.com>",),
    )  # fmt: skip
    assert resp.status == 486  # anyone may call a local user...
    (invite,) = [r for r in bob_phone.requests() if r.method == "INVITE"]
    assert "P-Asserted-Identity" not in invite.headers  # ...but asserts nothing


async def test_a_dialog_through_the_proxy_still_works_and_its_token_is_checked(
    site: Site, endpoints: Callable[..., Any]
) -> None:
    # alice (authenticated) calls the outside host, which answers 200 with our
    # Record-Route; her BYE then goes through the proxy with nothing but the token.
    target = await endpoints(OUTSIDE, invite_status=200)
    alice_ep = await endpoints(ATTACKER)
    alice = sip(alice_ep, site)
    ok = await alice.request(
        "INVITE", outside_uri(target), from_=f"sip:alice@{DOMAIN}", password="wonderland"
    )
    assert ok.status == 200
    rr = ok.headers.values("Record-Route")
    assert rr and "p2d=" in rr[0]
    sent = parse_message(alice.last_request)  # the INVITE as alice sent it
    assert isinstance(sent, Request)
    from_hdr, to_hdr = sent.headers.get("From"), ok.headers.get("To")

    def in_dialog(route: str, cseq: int) -> bytes:
        return (
            f"BYE sip:ep@{target.host}:{target.port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {alice_ep.host}:{alice_ep.port};branch=z9hG4bKbye{cseq};rport\r\n"
            f"Max-Forwards: 70\r\nRoute: {route}\r\nFrom: {from_hdr}\r\nTo: {to_hdr}\r\n"
            f"Call-ID: {sent.call_id}\r\nCSeq: {cseq} BYE\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    token = rr[0].split("p2d=")[1].rstrip(">")
    forged = rr[0].replace(token, token[::-1])
    before = len(target.requests())
    alice_ep.sendto(in_dialog(forged, 10), "127.0.0.1", site.sip_port)
    assert (await alice.final(sent.call_id, 10)).status in (403, 407)
    await nothing_arrives_after(target, before)
    alice_ep.sendto(in_dialog(rr[0], 11), "127.0.0.1", site.sip_port)
    assert (await alice.final(sent.call_id, 11)).status == 200
    assert [r.method for r in target.requests()[before:]] == ["BYE"]


async def nothing_arrives_after(target: Endpoint, count: int) -> None:
    await asyncio.sleep(QUIET)
    assert len(target.requests()) == count

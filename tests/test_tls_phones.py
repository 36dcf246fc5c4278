"""Real phones over TLS (RFC 3261 §26): pjsua2 phones register and call through a site
with its self-signed default certificate and with one the test's own CA issued, checking
it as a careful phone does; baresip 1.0 (Debian) registers over TLS and calls a pjsua2
phone. The site is a real ``p2psip run`` process."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.support.baresip import AVAILABLE, Baresip
from tests.support.site import free_port
from tests.test_tls import make_ca

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
DOMAIN = "example.com"


def tls_site(site_factory: Any, *args: str) -> tuple[Any, str]:
    """A site with its TLS port given (on a port other than 5060 it would be any free
    port); returns it and the phones' outbound proxy, HOST:TLS-PORT."""
    port = free_port()
    site = site_factory("--domain", DOMAIN, "--tls-listen", f"{HOST}:{port}", *args)
    return site, f"{HOST}:{port}"


def call(caller: Any, callee: Any, target: str) -> dict[str, Any]:
    """A whole call: INVITE, 200, ACK, BYE from the caller. Returns the callee's INVITE."""
    caller.call(target)
    incoming: dict[str, Any] = callee.wait_incoming(timeout=15)
    callee.answer(200)
    assert caller.wait_state("CONFIRMED", timeout=15)["call_id"] == incoming["call_id"]
    callee.wait_state("CONFIRMED", timeout=15)
    caller.hangup()  # the BYE goes through the proxy (Record-Route) over TLS
    callee.wait_state("DISCONNECTED", timeout=15)
    caller.wait_state("DISCONNECTED", timeout=15)
    return incoming


def test_phones_register_and_call_over_tls_trusting_the_self_signed_default(
    site_factory: Any, phone_factory: Any, tmp_path: Path
) -> None:
    site, proxy = tls_site(site_factory)
    tls_port = proxy.rsplit(":", 1)[1]
    cert, key = tmp_path / "data" / "tls.crt", tmp_path / "data" / "tls.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "no --tls-cert: phones get the self-signed certificate" in site.log()
    # The phones are given the site's certificate and check the proxy against it. alice
    # and dave speak SIPS (sips: Contact), bob plain TLS (sip:...;transport=tls).
    tls = {"transport": "tls", "tls_ca": str(cert), "tls_verify": True}
    alice = phone_factory("alice", sips=True, **tls)
    dave = phone_factory("dave", sips=True, **tls)
    bob = phone_factory("bob", **tls)
    for phone in (alice, dave, bob):
        assert phone.register(proxy, phone.name, DOMAIN) == 200
    assert f"from tls:{HOST}:" in site.log()  # registered over their TLS flows

    invite = call(alice, bob, f"sip:bob@{DOMAIN}")["msg"]
    assert f"Via: SIP/2.0/TLS {HOST}:{tls_port};" in invite
    assert f"Record-Route: <sip:{HOST}:{tls_port};transport=tls;lr;" in invite
    # SIPS end to end: a sips: Record-Route (RFC 3261 §16.6 step 4).
    invite = call(alice, dave, f"sips:dave@{DOMAIN}")["msg"]
    assert invite.startswith(f"INVITE sips:dave@{HOST}:")
    assert f"Record-Route: <sips:{HOST}:{tls_port};lr;" in invite

    # A phone registered over UDP cannot take a SIPS call (RFC 5630: 480, Warning 380).
    carol = phone_factory("carol")
    assert carol.register(site.sip, "carol", DOMAIN) == 200
    alice.call(f"sips:carol@{DOMAIN}")
    assert alice.wait_state("DISCONNECTED", timeout=15)["code"] == 480
    assert "SIPS Request-URI" not in site.log()
    # ... but a sip: call from TLS to UDP goes through, record-routed for both legs.
    invite = call(bob, carol, f"sip:carol@{DOMAIN}")["msg"]
    assert f"Via: SIP/2.0/UDP {HOST}:{site.port};" in invite
    assert f"<sip:{HOST}:{site.port};lr;" in invite
    assert f"<sip:{HOST}:{tls_port};transport=tls;lr;" in invite


def test_phones_check_a_certificate_from_a_ca_of_the_tests_own(
    site_factory: Any, phone_factory: Any, tmp_path: Path
) -> None:
    ca, cert, key = make_ca(tmp_path / "pki", [HOST, DOMAIN])
    site, proxy = tls_site(site_factory, "--tls-cert", str(cert), "--tls-key", str(key))
    assert "self-signed" not in site.log()
    assert not (tmp_path / "data" / "tls.crt").exists()
    alice = phone_factory("alice", transport="tls", tls_ca=str(ca), tls_verify=True)
    bob = phone_factory("bob", transport="tls", tls_ca=str(ca), tls_verify=True)
    assert alice.register(proxy, "alice", DOMAIN) == 200
    assert bob.register(proxy, "bob", DOMAIN) == 200
    call(alice, bob, f"sip:bob@{DOMAIN}")
    # A phone that trusts another CA will not talk to this proxy at all.
    other_ca, _, _ = make_ca(tmp_path / "other")
    eve = phone_factory("eve", transport="tls", tls_ca=str(other_ca), tls_verify=True)
    assert eve.register(proxy, "eve", DOMAIN) != 200
    assert "registered sip:eve@" not in site.log()


@pytest.mark.skipif(not AVAILABLE, reason="needs baresip (Debian baresip-core)")
def test_baresip_registers_over_tls_and_calls_a_pjsua2_phone(
    site_factory: Any, phone_factory: Any, tmp_path: Path
) -> None:
    users = tmp_path / "users.toml"
    users.write_text('[users."alice"]\npassword = "wonderland"\n[users."bob"]\npassword = "b"\n')
    # baresip resolves the domain of its AOR: the site serves localhost.
    port = free_port()
    site = site_factory(
        "--domain", "localhost", "--users", str(users), "--tls-listen", f"{HOST}:{port}"
    )
    bob = phone_factory("bob", transport="tls", tls_ca=str(tmp_path / "data" / "tls.crt"))
    assert bob.register(f"{HOST}:{port}", "bob", "localhost", password="b") == 200
    alice = Baresip(
        tmp_path, "sip:alice@localhost", "wonderland", f"{HOST}:{port}",
        tls=True, cafile=tmp_path / "data" / "tls.crt", commands=("/dial sip:bob@localhost",),
    )  # fmt: skip
    try:
        alice.wait_for(r"alice@localhost: .*200 OK")
        registered = r"registered sip:alice@localhost at \S+;transport=tls from tls:"
        assert re.search(registered, site.log()), site.log()
        incoming = bob.wait_incoming(timeout=15)
        assert "alice@localhost" in incoming["remote_uri"]
        assert f"Via: SIP/2.0/TLS {HOST}:{port};" in incoming["msg"]
        bob.answer(200)
        bob.wait_state("CONFIRMED", timeout=10)
        alice.wait_for(r"Call established")
        bob.hangup()  # the BYE reaches baresip over its TLS connection
        bob.wait_state("DISCONNECTED", timeout=10)
        alice.wait_for(r"session closed|terminated")
    finally:
        alice.close()

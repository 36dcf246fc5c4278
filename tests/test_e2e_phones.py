"""Real pjsua2 phones register with a real ``p2psip run`` process and call each other."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

DOMAIN = "example.com"


def _call(caller, callee, target: str) -> None:
    caller.call(target)
    incoming = callee.wait_incoming(timeout=10)
    assert f"{DOMAIN}" in incoming["local_uri"] or "@" in incoming["local_uri"]
    callee.answer(200)
    a = caller.wait_state("CONFIRMED", timeout=10)
    b = callee.wait_state("CONFIRMED", timeout=10)
    assert a["call_id"] == b["call_id"]
    caller.hangup()
    # The BYE follows the Record-Route through the proxy to the callee.
    callee.wait_state("DISCONNECTED", timeout=10)
    caller.wait_state("DISCONNECTED", timeout=10)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_two_phones_register_and_call(site_factory, phone_factory, transport) -> None:
    site = site_factory("--domain", DOMAIN)
    alice = phone_factory("alice", transport=transport)
    bob = phone_factory("bob", transport=transport)
    assert alice.register(site.sip, "alice", DOMAIN) == 200
    assert bob.register(site.sip, "bob", DOMAIN) == 200
    _call(alice, bob, f"sip:bob@{DOMAIN}")
    # And the other way round.
    _call(bob, alice, f"sip:alice@{DOMAIN}")


def test_udp_phone_calls_tcp_phone(site_factory, phone_factory) -> None:
    site = site_factory("--domain", DOMAIN)
    alice = phone_factory("alice", transport="udp")
    bob = phone_factory("bob", transport="tcp")
    assert alice.register(site.sip, "alice", DOMAIN) == 200
    assert bob.register(site.sip, "bob", DOMAIN) == 200
    _call(alice, bob, f"sip:bob@{DOMAIN}")
    _call(bob, alice, f"sip:alice@{DOMAIN}")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_digest_auth_register_and_call(
    site_factory, phone_factory, tmp_path: Path, transport
) -> None:
    users = tmp_path / "users.toml"
    users.write_text(
        '[users."alice"]\npassword = "wonderland"\n[users."bob"]\npassword = "builder"\n'
    )
    site = site_factory("--domain", DOMAIN, "--users", str(users))
    alice = phone_factory("alice", transport=transport)
    bob = phone_factory("bob", transport=transport)
    assert alice.register(site.sip, "alice", DOMAIN, password="wonderland") == 200
    assert bob.register(site.sip, "bob", DOMAIN, password="builder") == 200
    _call(alice, bob, f"sip:bob@{DOMAIN}")


def test_wrong_password_is_refused(site_factory, phone_factory, tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    users.write_text('[users."alice"]\npassword = "wonderland"\n')
    site = site_factory("--domain", DOMAIN, "--users", str(users))
    mallory = phone_factory("mallory")
    assert mallory.register(site.sip, "alice", DOMAIN, password="guess") in (401, 403)
    stranger = phone_factory("stranger")
    assert stranger.register(site.sip, "nobody", DOMAIN, password="x") in (401, 403, 404)


def test_call_to_unknown_user_gets_404(site_factory, phone_factory) -> None:
    site = site_factory("--domain", DOMAIN)
    alice = phone_factory("alice")
    assert alice.register(site.sip, "alice", DOMAIN) == 200
    alice.call(f"sip:nobody@{DOMAIN}")
    state = alice.wait_state("DISCONNECTED", timeout=10)
    assert state["code"] == 404


def test_call_to_unregistered_user_gets_480(site_factory, phone_factory) -> None:
    site = site_factory("--domain", DOMAIN)
    alice = phone_factory("alice")
    bob = phone_factory("bob")
    assert alice.register(site.sip, "alice", DOMAIN) == 200
    assert bob.register(site.sip, "bob", DOMAIN) == 200
    assert bob.unregister() == 200
    alice.call(f"sip:bob@{DOMAIN}")
    state = alice.wait_state("DISCONNECTED", timeout=10)
    assert state["code"] == 480


def test_caller_cancels_before_answer(site_factory, phone_factory) -> None:
    site = site_factory("--domain", DOMAIN)
    alice = phone_factory("alice")
    bob = phone_factory("bob")
    assert alice.register(site.sip, "alice", DOMAIN) == 200
    assert bob.register(site.sip, "bob", DOMAIN) == 200
    alice.call(f"sip:bob@{DOMAIN}")
    bob.wait_incoming(timeout=10)
    alice.wait_state("EARLY", timeout=10)
    alice.hangup()  # CANCEL
    assert alice.wait_state("DISCONNECTED", timeout=10)["code"] == 487
    bob.wait_state("DISCONNECTED", timeout=10)


def test_forks_to_every_contact_first_answer_wins(site_factory, phone_factory) -> None:
    site = site_factory("--domain", DOMAIN)
    alice = phone_factory("alice")
    desk = phone_factory("bob-desk")
    mobile = phone_factory("bob-mobile", transport="tcp")
    assert alice.register(site.sip, "alice", DOMAIN) == 200
    assert desk.register(site.sip, "bob", DOMAIN) == 200
    assert mobile.register(site.sip, "bob", DOMAIN) == 200
    alice.call(f"sip:bob@{DOMAIN}")
    desk.wait_incoming(timeout=10)
    mobile.wait_incoming(timeout=10)
    mobile.answer(200)
    alice.wait_state("CONFIRMED", timeout=10)
    # The other leg is CANCELled by the proxy.
    assert desk.wait_state("DISCONNECTED", timeout=10)["code"] == 487
    alice.hangup()
    mobile.wait_state("DISCONNECTED", timeout=10)


def test_redis_sigkill_loses_no_registration(site_factory, phone_factory, redis_server) -> None:
    site = site_factory("--domain", DOMAIN, "--redis-url", redis_server.url)
    alice = phone_factory("alice")
    bob = phone_factory("bob", transport="tcp")
    carol = phone_factory("carol")
    assert alice.register(site.sip, "alice", DOMAIN) == 200
    assert bob.register(site.sip, "bob", DOMAIN) == 200
    assert carol.register(site.sip, "carol", DOMAIN) == 200
    site.kill()
    site.start()  # same port, same Redis; the phones do not re-register
    _call(alice, carol, f"sip:carol@{DOMAIN}")
    # bob's TCP connection died with the process: the proxy connects to his contact.
    _call(alice, bob, f"sip:bob@{DOMAIN}")

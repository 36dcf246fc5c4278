"""The phones people have log in with a user made from a clear password: baresip 1.0 and
sipsak (both Debian) register, and baresip calls a pjsua2 phone through the proxy.

Both give up on a SHA-256 challenge (baresip even next to an MD5 one), which is why the
default ``digest_algorithms`` is MD5 alone. The site serves ``localhost`` because both
resolve the domain of the URI they are given.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.baresip import AVAILABLE, Baresip

pytestmark = pytest.mark.e2e

DOMAIN = "localhost"
USERS = '[users."alice"]\npassword = "wonderland"\n[users."bob"]\npassword = "builder"\n'


@pytest.fixture
def field_site(site_factory, tmp_path: Path):
    users = tmp_path / "users.toml"
    users.write_text(USERS)
    return site_factory("--domain", DOMAIN, "--users", str(users))


@pytest.mark.skipif(shutil.which("sipsak") is None, reason="needs sipsak")
def test_sipsak_registers(field_site, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["sipsak", "-U", "-s", f"sip:alice@{DOMAIN}:{field_site.port}", "-u", "alice",
         "-a", "wonderland", "-x", "120", "-vv"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "registering user alice" in out and "OK" in out, out[-3000:]
    assert "registered sip:alice@localhost" in field_site.log()
    # The wrong password is refused.
    proc = subprocess.run(
        ["sipsak", "-U", "-s", f"sip:alice@{DOMAIN}:{field_site.port}", "-u", "alice",
         "-a", "not-it", "-x", "120"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0


@pytest.mark.skipif(not AVAILABLE, reason="needs baresip (Debian baresip-core)")
def test_baresip_registers_and_calls_a_pjsua2_phone(
    field_site, phone_factory, tmp_path: Path
) -> None:
    bob = phone_factory("bob")
    assert bob.register(field_site.sip, "bob", DOMAIN, password="builder") == 200
    alice = Baresip(
        tmp_path, f"sip:alice@{DOMAIN}", "wonderland", field_site.sip,
        commands=(f"/dial sip:bob@{DOMAIN}",),
    )  # fmt: skip
    try:
        alice.wait_for(r"alice@localhost: .*200 OK")
        incoming = bob.wait_incoming(timeout=15)
        assert "alice@localhost" in incoming["remote_uri"]
        # The proxy authenticated alice and says so to the callee (RFC 3325).
        assert "P-Asserted-Identity: <sip:alice@localhost>" in incoming["msg"]
        bob.answer(200)
        bob.wait_state("CONFIRMED", timeout=10)
        alice.wait_for(r"Call established")
        bob.hangup()
        bob.wait_state("DISCONNECTED", timeout=10)
        # bob's BYE reached baresip through the proxy.
        alice.wait_for(r"session closed|terminated")
    finally:
        alice.close()

"""Brute force stalls: sipvicious' svcrack, with the right password at line 300 of its
dictionary, does not find it; the real user, at another address, registers throughout."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

DOMAIN = "example.com"
PASSWORD = "tr0ub4dor-300"
ATTACKER = "127.0.0.9"


@pytest.mark.skipif(shutil.which("svcrack") is None, reason="needs sipvicious (svcrack)")
def test_svcrack_does_not_find_the_password_and_the_user_still_registers(
    site_factory, phone_factory, tmp_path: Path
) -> None:
    users = tmp_path / "users.toml"
    users.write_text(f'[users."1001"]\npassword = "{PASSWORD}"\n')
    words = [f"guess{i:03d}" for i in range(1, 401)]
    words[299] = PASSWORD  # line 300
    dictionary = tmp_path / "dictionary.txt"
    dictionary.write_text("\n".join(words) + "\n")
    site = site_factory("--domain", DOMAIN, "--users", str(users), "--admin-token", "t")

    result: dict[str, str] = {}

    def crack() -> None:
        proc = subprocess.run(
            ["svcrack", "-u1001", "-d", str(dictionary), "--domain", DOMAIN,
             "-b", ATTACKER, "-p", str(site.port), site.host],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
        )  # fmt: skip
        result["out"] = proc.stdout + proc.stderr

    attack = threading.Thread(target=crack)
    attack.start()
    phone = phone_factory("1001", bind_ip="127.0.0.3")
    try:
        # During the attack the user, at another address, registers with the password.
        assert phone.register(site.sip, "1001", DOMAIN, password=PASSWORD) == 200
    finally:
        attack.join(250)
    out = result["out"]
    assert PASSWORD not in out, out[-2000:]
    assert "found nothing" in out or "| 1001" not in out, out[-2000:]
    # ... and after it.
    assert phone.register(site.sip, "1001", DOMAIN, password=PASSWORD) == 200
    stats = httpx.get(
        f"http://{site.admin}/stats", headers={"Authorization": "Bearer t"}, timeout=10
    ).json()
    counters = stats["counters"]
    assert counters["auth_blocks"] >= 1
    # The block stopped the guessing: far fewer than 300 guesses were even checked.
    assert counters["auth_failures"] < 50, counters
    assert "blocking" in site.log() and "for '1001'" in site.log()

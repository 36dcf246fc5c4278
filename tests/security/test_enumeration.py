"""Scanners learn nothing: which users exist cannot be told from the answers.

A user who exists but is not registered, one who registered and was removed (only
tombstones left in the DHT), and one who never existed get the same answer, with the
same header fields, to REGISTER (a challenge, then 403 for any wrong credentials) and to
calls from outside (404). Tested with a raw client and with sipvicious' ``svwar``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.sip import auth as digest
from proxy.sip.auth import UserRecord, ha1
from proxy.site import Site
from tests.support.site import free_port

from .conftest import DOMAIN, sip
from .ua import Endpoint

pytestmark = pytest.mark.e2e

REALM = DOMAIN
# 1001 has both HA1s, 1005 only an MD5 one; 1007 registers and is removed; 1009 never was.
KNOWN = ("1001", "1005", "1007")


@pytest.fixture
async def scanned_site(site: Site, endpoints: Callable[..., Any]) -> Site:
    users = site.users
    await users.put(UserRecord.from_password("1001", REALM, "s3cret-1001"))
    await users.put(UserRecord("1005", ha1("1005", REALM, "s3cret-1005"), None))
    await users.put(UserRecord.from_password("1007", REALM, "s3cret-1007"))
    phone = sip(await endpoints("127.0.0.1"), site)
    ok = await phone.request("REGISTER", f"sip:{DOMAIN}", from_=f"sip:1007@{DOMAIN}",
                             to=f"sip:1007@{DOMAIN}", password="s3cret-1007")  # fmt: skip
    assert ok.status == 200
    assert await site.registrar.remove(f"sip:1007@{DOMAIN}") == 1
    assert await site.adaptor.flush()
    return site


def shape(resp: Any) -> tuple[int, str, tuple[str, ...]]:
    """What a scanner can compare: status, reason and the header names in order."""
    return resp.status, resp.reason, tuple(name for name, _ in resp.headers)


async def test_calls_from_outside_get_one_answer_for_every_unreachable_user(
    scanned_site: Site, endpoints: Callable[..., Any]
) -> None:
    scanner = sip(await endpoints("127.0.0.9"), scanned_site)
    for method in ("INVITE", "OPTIONS", "MESSAGE"):
        seen = set()
        for user in (*KNOWN, "1009"):
            resp = await scanner.request(
                method, f"sip:{user}@{DOMAIN}", from_="sip:scanner@evil.test"
            )
            seen.add(shape(resp))
        assert len(seen) == 1, (method, seen)
        assert next(iter(seen))[0] == 404


async def test_an_authenticated_local_user_learns_who_exists(
    scanned_site: Site, endpoints: Callable[..., Any]
) -> None:
    # Local users may get the precise answer: 480 for a user who exists (or existed
    # lately: 1007's tombstones), 404 for one who never did.
    alice = sip(await endpoints("127.0.0.1"), scanned_site)
    await scanned_site.users.put(UserRecord.from_password("alice", REALM, "wonderland"))
    got = {}
    for user in (*KNOWN, "1009"):
        resp = await alice.request(
            "INVITE", f"sip:{user}@{DOMAIN}", from_=f"sip:alice@{DOMAIN}", password="wonderland"
        )
        got[user] = resp.status
    assert got == {"1001": 480, "1005": 480, "1007": 480, "1009": 404}


async def test_register_challenges_and_refusals_look_the_same(
    scanned_site: Site, endpoints: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    scanner = sip(await endpoints("127.0.0.9"), scanned_site)
    challenges, refusals = set(), set()
    digests: list[str] = []
    real = digest.digest_response

    def counting(**kw: Any) -> str:
        digests.append(kw["algorithm"])
        return real(**kw)

    monkeypatch.setattr(digest, "digest_response", counting)
    for user in (*KNOWN, "1009"):
        aor = f"sip:{user}@{DOMAIN}"
        first = await scanner.request("REGISTER", f"sip:{DOMAIN}", from_=aor, to=aor)
        assert first.status == 401
        offered = [re.sub(r'nonce="[^"]*"', "nonce=…", v)
                   for v in first.headers.get_all("WWW-Authenticate")]  # fmt: skip
        challenges.add(tuple(offered))
        wrong = await scanner.request(
            "REGISTER", f"sip:{DOMAIN}", from_=aor, to=aor, password="not-it"
        )
        refusals.add(shape(wrong))
    assert len(challenges) == 1, challenges  # the same algorithms, in the same order
    assert next(iter(challenges))[0].startswith('Digest realm="example.com", ')
    assert len(refusals) == 1 and next(iter(refusals))[:2] == (403, "Forbidden"), refusals
    # A digest was computed for every attempt, the unknown user's included.
    assert len(digests) == len(KNOWN) + 1


@pytest.mark.skipif(shutil.which("svwar") is None, reason="needs sipvicious (svwar)")
@pytest.mark.parametrize("method", ["REGISTER", "INVITE"])
async def test_svwar_cannot_single_out_the_users(
    scanned_site: Site, method: str, tmp_path: Path
) -> None:
    # svwar first asks for a made-up extension, then reports the extensions whose answer
    # differs. It stops at the first answer it cannot class, so each extension gets a
    # scan of its own (in parallel); the verdict must be the same for all of them.
    async def scan(ext: str) -> tuple[bool, frozenset[str]]:
        proc = await asyncio.create_subprocess_exec(
            "svwar", "--force", f"-e{ext}", "-m", method, "--domain", DOMAIN,
            "-b", "127.0.0.9", "-P", str(free_port("127.0.0.9")),
            "-p", str(scanned_site.sip_port), "-t", "0.05", "--maximumtime", "3",
            "127.0.0.1",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        text = out.decode(errors="replace")
        found = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
        return "found nothing" in text, frozenset(found - {"Extension"})

    before = scanned_site.counters.requests_received[method]
    exts = (*KNOWN, "1009")
    verdicts = dict(zip(exts, await asyncio.gather(*map(scan, exts)), strict=True))
    # Each scan asked about the made-up extension and about its own.
    assert scanned_site.counters.requests_received[method] - before >= 2 * len(exts)
    assert len(set(verdicts.values())) == 1, verdicts
    assert not any(ext in found for _, found in verdicts.values() for ext in KNOWN), verdicts


__all__ = ["Endpoint"]

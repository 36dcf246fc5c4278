"""Calls across sites through the DHT: three sites on 127.0.0.2/3/4, real pjsua2 phones.

Each site runs its compose services (a standalone DHT node and the proxy, see
tests/support/deployment.py); site 2's DHT node bootstraps the others. No central server.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.support.deployment import Deployment, SiteProcesses
from tests.support.sipp import free_port
from tests.support.site import ROOT

pytestmark = pytest.mark.e2e

DOMAIN = "example.com"


def lookup(deployment: Deployment, site: SiteProcesses, user: str) -> dict[str, object] | None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "proxy.cli", "lookup", f"sip:{user}@{DOMAIN}",
            "--bootstrap", site.dht, "--trust", str(deployment.trust_dir),
            "--data-dir", str(site.data_dir), "--timeout", "5",
        ],
        capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
    )  # fmt: skip
    if proc.returncode == 1:
        return None
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_found(deployment: Deployment, site: SiteProcesses, user: str, homes: set[str]) -> None:
    """Wait until the DHT (asked through ``site``) holds ``user`` at exactly ``homes``."""
    deadline = time.monotonic() + 10
    seen = None
    while time.monotonic() < deadline:
        seen = lookup(deployment, site, user)
        if seen is not None and {b["home"] for b in seen["bindings"]} == homes:  # type: ignore[attr-defined]
            return
        time.sleep(0.2)
    raise AssertionError(f"{user} not found at {homes} through {site.name}: {seen}")


def home(site: SiteProcesses) -> str:
    return f"sip:{site.host}:{site.sip_port}"


def call(caller, callee, target: str) -> None:
    caller.call(target)
    callee.wait_incoming(timeout=15)
    callee.answer(200)
    a = caller.wait_state("CONFIRMED", timeout=15)
    b = callee.wait_state("CONFIRMED", timeout=15)
    assert a["call_id"] == b["call_id"]
    caller.hangup()  # the BYE goes back through both proxies (Record-Route)
    callee.wait_state("DISCONNECTED", timeout=15)
    caller.wait_state("DISCONNECTED", timeout=15)


def test_phones_at_different_sites_call_through_the_dht(deployment, phone_factory) -> None:
    s2, s3, s4 = deployment.start_sites([2, 3, 4])
    alice = phone_factory("alice", bind_ip=s2.host)
    bob = phone_factory("bob", bind_ip=s4.host)
    assert alice.register(s2.sip, "alice", DOMAIN) == 200
    assert bob.register(s4.sip, "bob", DOMAIN) == 200
    wait_found(deployment, s3, "bob", {home(s4)})
    call(alice, bob, f"sip:bob@{DOMAIN}")
    call(bob, alice, f"sip:alice@{DOMAIN}")

    # A whole site goes down; the two others keep calling each other.
    s3.stop()
    carol = phone_factory("carol", bind_ip=s2.host)
    dave = phone_factory("dave", bind_ip=s4.host, transport="tcp")
    assert carol.register(s2.sip, "carol", DOMAIN) == 200
    assert dave.register(s4.sip, "dave", DOMAIN) == 200
    wait_found(deployment, s2, "dave", {home(s4)})
    call(carol, dave, f"sip:dave@{DOMAIN}")
    call(dave, carol, f"sip:carol@{DOMAIN}")


def test_user_at_two_sites_rings_at_both_first_answer_wins(deployment, phone_factory) -> None:
    s2, s3, s4 = deployment.start_sites([2, 3, 4])
    caller = phone_factory("caller", bind_ip=s3.host)
    desk = phone_factory("bob-desk", bind_ip=s2.host)
    mobile = phone_factory("bob-mobile", bind_ip=s4.host)
    assert caller.register(s3.sip, "caller", DOMAIN) == 200
    assert desk.register(s2.sip, "bob", DOMAIN) == 200
    assert mobile.register(s4.sip, "bob", DOMAIN) == 200
    wait_found(deployment, s3, "bob", {home(s2), home(s4)})
    caller.call(f"sip:bob@{DOMAIN}")
    desk.wait_incoming(timeout=15)
    mobile.wait_incoming(timeout=15)
    mobile.answer(200)
    caller.wait_state("CONFIRMED", timeout=15)
    assert desk.wait_state("DISCONNECTED", timeout=15)["code"] == 487  # CANCELled
    caller.hangup()
    mobile.wait_state("DISCONNECTED", timeout=15)


def test_user_who_moves_is_reached_at_the_new_site(deployment, phone_factory) -> None:
    s2, s3, s4 = deployment.start_sites([2, 3, 4])
    caller = phone_factory("caller", bind_ip=s3.host)
    assert caller.register(s3.sip, "caller", DOMAIN) == 200
    at_work = phone_factory("erin-work", bind_ip=s2.host)
    assert at_work.register(s2.sip, "erin", DOMAIN) == 200
    wait_found(deployment, s3, "erin", {home(s2)})
    call(caller, at_work, f"sip:erin@{DOMAIN}")
    assert at_work.unregister() == 200  # leaves site 2 ...
    at_home = phone_factory("erin-home", bind_ip=s4.host)
    assert at_home.register(s4.sip, "erin", DOMAIN) == 200  # ... and registers at site 4
    wait_found(deployment, s3, "erin", {home(s4)})
    call(caller, at_home, f"sip:erin@{DOMAIN}")


def test_unknown_user_everywhere_gets_404(deployment, phone_factory) -> None:
    s2, _s3, _s4 = deployment.start_sites([2, 3, 4])
    alice = phone_factory("alice", bind_ip=s2.host)
    assert alice.register(s2.sip, "alice", DOMAIN) == 200
    alice.call(f"sip:nobody@{DOMAIN}")
    assert alice.wait_state("DISCONNECTED", timeout=15)["code"] == 404


def last_stats(svc) -> dict[str, float]:
    """The proxy's final ``stats:`` log line (written as it stops)."""
    lines = [ln for ln in svc.log_path.read_text().splitlines() if " stats: " in ln]
    assert lines, svc.log()
    return json.loads(lines[-1].split(" stats: ", 1)[1])


def test_sipp_calls_across_sites_use_the_lookup_cache(deployment, sipp) -> None:
    s2, _s3, s4 = deployment.start_sites([2, 3, 4])
    callee_port = free_port()
    registered = sipp.register_contact((s4.host, s4.sip_port), "bob", callee_port, domain=DOMAIN)
    assert registered.ok, registered.report()
    wait_found(deployment, s2, "bob", {home(s4)})
    uas = sipp.start_uas(port=callee_port)
    calls = 100
    caller = sipp.call(
        (s2.host, s2.sip_port), "bob", domain=DOMAIN, calls=calls, rate=20, timeout_s=60
    )
    callee = uas.stop()
    assert (caller.successful, caller.failed) == (calls, 0), caller.report()
    assert (callee.successful, callee.failed) == (calls, 0), callee.report()

    s2.services["proxy"].stop()
    stats = last_stats(s2.services["proxy"])
    assert stats["calls_routed_dht"] == calls
    # A burst of calls to one user costs a handful of lookups, not one per call.
    assert 1 <= stats["dht_lookups"] <= calls // 10, stats
    assert stats["dht_cache_hits"] >= calls - stats["dht_lookups"], stats


def test_unreachable_home_proxy_gives_a_clean_failure(deployment, phone_factory) -> None:
    s2, _s3, s4 = deployment.start_sites([2, 3, 4])
    alice = phone_factory("alice", bind_ip=s2.host)
    bob = phone_factory("bob", bind_ip=s4.host)
    assert alice.register(s2.sip, "alice", DOMAIN) == 200
    assert bob.register(s4.sip, "bob", DOMAIN) == 200
    wait_found(deployment, s2, "bob", {home(s4)})
    # Site 4's proxy dies; the DHT (site 4's standalone node too) still names it as home.
    s4.services["proxy"].stop(signal.SIGKILL)
    started = time.monotonic()
    alice.call(f"sip:bob@{DOMAIN}")
    # No answer at all from bob's home proxy (not even 100 Trying) gives it up after
    # home_timeout: a final answer in about a second, not after Timer B (32 s).
    state = alice.wait_state("DISCONNECTED", timeout=45)
    assert state["code"] in (480, 503), state
    assert time.monotonic() - started < 10  # generous on a busy machine; Timer B is 32 s
    proxy = s2.services["proxy"]
    assert proxy.alive()
    assert f"no answer from home site site4 ({home(s4)})" in proxy.log(), proxy.log()
    assert "site site4 at " in proxy.log() and "is unreachable" in proxy.log(), proxy.log()
    # The next call ends as fast (the site may have come back: it is tried again).
    started = time.monotonic()
    alice.call(f"sip:bob@{DOMAIN}")
    assert alice.wait_state("DISCONNECTED", timeout=15)["code"] in (480, 503)
    assert time.monotonic() - started < 10


def test_a_spoofed_site_relay_rings_nothing(deployment, phone_factory) -> None:
    import socket
    import uuid

    s2, _s3, s4 = deployment.start_sites([2, 3, 4])
    bob = phone_factory("bob", bind_ip=s4.host)
    assert bob.register(s4.sip, "bob", DOMAIN) == 200
    # From an address that is no member site, a request dressed as a relay between sites.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.9", 0))
        sock.settimeout(5)
        port = sock.getsockname()[1]
        for from_ in (f"sip:alice@{DOMAIN}", "sip:mallory@evil.test"):
            call_id = uuid.uuid4().hex
            sock.sendto(
                (
                    f"INVITE sip:bob@{DOMAIN};p2psip=home SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP 127.0.0.9:{port};branch=z9hG4bK{call_id[:12]};rport\r\n"
                    f"Max-Forwards: 70\r\nFrom: <{from_}>;tag=spoof\r\n"
                    f"To: <sip:bob@{DOMAIN}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
                    f"Contact: <sip:x@127.0.0.9:{port}>\r\nContent-Length: 0\r\n\r\n"
                ).encode(),
                (s4.host, s4.sip_port),
            )
            statuses = []
            while not statuses or statuses[-1] < 200:
                reply = sock.recv(65535).decode()
                statuses.append(int(reply.split()[1]))
            assert statuses[-1] == 403, statuses
    with pytest.raises(Exception, match="incoming"):
        bob.wait_incoming(timeout=1)
    # A genuine relay between member sites still rings bob.
    alice = phone_factory("alice", bind_ip=s2.host)
    assert alice.register(s2.sip, "alice", DOMAIN) == 200
    wait_found(deployment, s2, "bob", {home(s4)})
    call(alice, bob, f"sip:bob@{DOMAIN}")


def test_reinvite_and_bye_cross_both_proxies(deployment, phone_factory) -> None:
    s2, _s3, s4 = deployment.start_sites([2, 3, 4])
    alice = phone_factory("alice", bind_ip=s2.host)
    bob = phone_factory("bob", bind_ip=s4.host, transport="tcp")
    assert alice.register(s2.sip, "alice", DOMAIN) == 200
    assert bob.register(s4.sip, "bob", DOMAIN) == 200
    wait_found(deployment, s2, "bob", {home(s4)})
    alice.call(f"sip:bob@{DOMAIN}")
    bob.wait_incoming(timeout=15)
    bob.answer(200)
    alice.wait_state("CONFIRMED", timeout=15)
    bob.wait_state("CONFIRMED", timeout=15)
    # In-dialog requests follow the route set both proxies recorded, either way.
    assert alice.reinvite() == 200
    assert bob.reinvite() == 200
    bob.hangup()
    alice.wait_state("DISCONNECTED", timeout=15)
    bob.wait_state("DISCONNECTED", timeout=15)

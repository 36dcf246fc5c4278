"""NAT keep-alives for phones without outbound, against a real ``p2psip run`` process
(``nat_keepalive_interval`` from its TOML file): a phone that stops answering loses its
binding within a few intervals; a real pjsua2 phone that answers keeps it with no
REGISTER in between. Plus the setting itself."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import ConfigError, build_config
from proxy.nat_keepalive import MISSES
from tests.support.phone import Phone
from tests.support.site import Site

DOMAIN = "example.com"
INTERVAL = 1.0
TOKEN = "t"


def nat_site(site_factory: Callable[..., Site], tmp_path: Path) -> Site:
    toml = tmp_path / "p2psip.toml"
    toml.write_text(f"[p2psip]\nnat_keepalive_interval = {INTERVAL}\n")
    return site_factory("--domain", DOMAIN, "--config", str(toml), "--admin-token", TOKEN)


def admin(site: Site, path: str) -> httpx.Response:
    return httpx.get(
        f"http://{site.admin}{path}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )


def counters(site: Site) -> dict[str, Any]:
    reply = admin(site, "/stats")
    assert reply.status_code == 200
    return dict(reply.json()["counters"])


def bindings(site: Site, user: str) -> list[dict[str, Any]]:
    reply = admin(site, f"/registrations/sip:{user}@{DOMAIN}")
    if reply.status_code == 404:
        return []
    assert reply.status_code == 200, reply.text
    return list(reply.json()["bindings"])


def register_from(sock: socket.socket, site: Site, user: str, expires: int) -> bytes:
    """A REGISTER from a phone behind NAT: its Via and Contact name a private address,
    the proxy sees the socket's. Returns the response."""
    msg = (
        f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.99:5060;branch=z9hG4bK{uuid.uuid4().hex[:10]};rport\r\n"
        f"From: <sip:{user}@{DOMAIN}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{user}@{DOMAIN}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}@10.0.0.99\r\n"
        "CSeq: 1 REGISTER\r\nMax-Forwards: 70\r\n"
        f"Contact: <sip:{user}@10.0.0.99:5060>\r\nExpires: {expires}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    sock.sendto(msg, (site.host, site.port))
    sock.settimeout(5)
    return sock.recv(65535)  # at the port it came from (rport), as through a NAT


@pytest.mark.e2e
def test_a_phone_that_stops_answering_loses_its_binding(
    site_factory: Callable[..., Site], tmp_path: Path
) -> None:
    site = nat_site(site_factory, tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        phone.bind(("127.0.0.1", 0))
        assert register_from(phone, site, "silent", expires=3600).startswith(b"SIP/2.0 200")
        [binding] = bindings(site, "silent")
        assert binding["contact"] == "sip:silent@10.0.0.99:5060"
        # The phone goes silent: it reads nothing and answers nothing from now on.
        registered = time.monotonic()
        deadline = registered + (MISSES + 2) * INTERVAL + 2
        while bindings(site, "silent"):
            assert time.monotonic() < deadline, "the silent phone kept its binding"
            time.sleep(0.2)
        gone_after = time.monotonic() - registered
        # It was pinged where its REGISTER came from (its NAT's address), each an OPTIONS.
        phone.setblocking(False)
        pings = []
        while True:
            try:
                pings.append(phone.recv(65535))
            except BlockingIOError:
                break
    assert pings and all(p.startswith(b"OPTIONS sip:silent@10.0.0.99:5060 ") for p in pings)
    assert gone_after >= (MISSES - 1) * INTERVAL  # not before it missed three
    assert counters(site)["nat_bindings_removed"] == 1
    assert "removed sip:silent@example.com at sip:silent@10.0.0.99:5060" in site.log()


@pytest.mark.e2e
def test_a_phone_that_answers_keeps_its_binding_without_registering_again(
    site_factory: Callable[..., Site], phone_factory: Callable[..., Phone], tmp_path: Path
) -> None:
    site = nat_site(site_factory, tmp_path)
    alice = phone_factory("alice")
    assert alice.register(site.sip, "alice", DOMAIN, expires=600) == 200
    before = counters(site)
    time.sleep((MISSES + 3) * INTERVAL)
    after = counters(site)
    assert after["registers_ok"] == before["registers_ok"]  # no refresh in between
    assert after["nat_keepalives_sent"] - before["nat_keepalives_sent"] >= MISSES + 1
    assert after["nat_bindings_removed"] == 0
    [binding] = bindings(site, "alice")
    assert binding["contact"] == alice.uri
    assert binding["source"] == f"udp:127.0.0.1:{alice.port}"


def test_the_keepalive_interval_comes_from_toml_or_the_environment(tmp_path: Path) -> None:
    assert build_config({}, env={}).nat_keepalive_interval == 30.0
    toml = tmp_path / "p2psip.toml"
    toml.write_text("[p2psip]\nnat_keepalive_interval = 15\nflow_timer = 90\n")
    cfg = build_config({}, env={}, config_file=toml)
    assert (cfg.nat_keepalive_interval, cfg.flow_timer) == (15.0, 90)
    env = {"P2PSIP_NAT_KEEPALIVE_INTERVAL": "0", "P2PSIP_FLOW_TIMER": "120"}
    cfg = build_config({}, env=env, config_file=toml)
    assert (cfg.nat_keepalive_interval, cfg.flow_timer) == (0.0, 120)  # 0: off


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"P2PSIP_NAT_KEEPALIVE_INTERVAL": "-5"}, "positive"),
        ({"P2PSIP_NAT_KEEPALIVE_INTERVAL": "0.5"}, "at least 1 second"),
        ({"P2PSIP_NAT_KEEPALIVE_INTERVAL": "often"}, "a number"),
        ({"P2PSIP_FLOW_TIMER": "5"}, "between 10 and 3600"),
    ],
)
def test_bad_keepalive_settings_are_refused(env: dict[str, str], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        build_config({}, env=env)

"""SIGTERM stops a site gracefully: new requests get 503 with Retry-After, ringing calls
are cancelled (the callee gets a CANCEL, the caller a final response), and the process
exits 0 once nothing is in flight."""

from __future__ import annotations

import signal
import socket
import time
import uuid

import pytest

from proxy.sip.message import parse_message

pytestmark = pytest.mark.e2e

DOMAIN = "example.com"


def register_raw(host: str, port: int) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
        me = s.getsockname()[1]
        s.sendto(
            (
                f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{uuid.uuid4().hex[:9]};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:late@{DOMAIN}>;tag=1\r\n"
                f"To: <sip:late@{DOMAIN}>\r\n"
                f"Call-ID: {uuid.uuid4().hex}\r\nCSeq: 1 REGISTER\r\n"
                f"Contact: <sip:late@127.0.0.1:{me}>\r\nContent-Length: 0\r\n\r\n"
            ).encode(),
            (host, port),
        )
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def test_sigterm_cancels_ringing_calls_and_exits_zero(site_factory, phone_factory) -> None:
    site = site_factory("--domain", DOMAIN)
    pairs = []
    for caller_name, callee_name in (("alice", "bob"), ("carol", "dave")):
        caller, callee = phone_factory(caller_name), phone_factory(callee_name)
        assert caller.register(site.sip, caller_name, DOMAIN) == 200
        assert callee.register(site.sip, callee_name, DOMAIN) == 200
        pairs.append((caller, callee))
    for caller, callee in pairs:
        caller.call(f"sip:{callee.name}@{DOMAIN}")
        callee.wait_incoming(timeout=10)  # it rings (180) and is never answered
        caller.wait_state("EARLY", timeout=10)

    assert site.proc is not None
    started = time.monotonic()
    site.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while "draining: " not in site.log() and time.monotonic() < deadline:
        time.sleep(0.02)
    # While it drains, a new request is turned away politely.
    reply = register_raw(site.host, site.port)
    assert reply is not None
    refused = parse_message(reply)
    assert (refused.status, refused.headers.get("Retry-After")) == (503, "5")  # type: ignore[union-attr]
    for caller, callee in pairs:
        ended = callee.wait_state("DISCONNECTED", timeout=10)  # the CANCEL came
        assert ended["code"] == 487, ended
        final = caller.wait_state("DISCONNECTED", timeout=10)  # and the final response
        assert final["code"] == 487, final
    assert site.proc.wait(15) == 0
    assert time.monotonic() - started < 12
    assert "draining: " in site.log() and "2 ringing call(s) cancelled" in site.log()

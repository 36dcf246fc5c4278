"""Smoke tests for the pjsua2 phone harness itself: direct calls, no proxy involved."""

from __future__ import annotations

import socket

import pytest

from tests.support.phone import Phone, PhoneError, PhoneFactory, Transport

pytestmark = pytest.mark.e2e

TRANSPORTS: list[Transport] = ["udp", "tcp"]


def _tp(transport: Transport) -> str:
    return ";transport=tcp" if transport == "tcp" else ""


def _dead_port(transport: Transport) -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_direct_call_confirmed_then_hung_up(
    phone_factory: PhoneFactory, transport: Transport
) -> None:
    a = phone_factory("a", transport=transport)
    b = phone_factory("b", transport=transport)
    assert a.port > 0
    assert b.port > 0
    assert a.port != b.port

    a.call(f"sip:b@127.0.0.1:{b.port}{_tp(transport)}")
    incoming = b.wait_incoming(timeout=10)
    assert "sip:a@127.0.0.1" in incoming["remote_uri"]
    assert incoming["call_id"]
    assert incoming["msg"].startswith("INVITE sip:b@127.0.0.1:")

    assert a.wait_state("EARLY", timeout=10)["code"] == 180  # auto_ringing
    b.answer(200)
    a_confirmed = a.wait_state("CONFIRMED", timeout=10)
    b_confirmed = b.wait_state("CONFIRMED", timeout=10)
    assert a_confirmed["code"] == 200
    assert a_confirmed["call_id"] == b_confirmed["call_id"] == incoming["call_id"]

    a.hangup()
    assert a.wait_state("DISCONNECTED", timeout=10)
    b_end = b.wait_state("DISCONNECTED", timeout=10)
    assert b_end["call_id"] == incoming["call_id"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rejected_call_reports_status_to_caller(
    phone_factory: PhoneFactory, transport: Transport
) -> None:
    a = phone_factory("a", transport=transport)
    b = phone_factory("b", transport=transport)

    a.call(f"sip:b@127.0.0.1:{b.port}{_tp(transport)}")
    b.wait_incoming(timeout=10)
    b.answer(486)

    end = a.wait_state("DISCONNECTED", timeout=10)
    assert end["code"] == 486
    with pytest.raises(PhoneError, match="486"):
        a.wait_state("CONFIRMED", timeout=1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_call_to_dead_port_disconnects(phone_factory: PhoneFactory, transport: Transport) -> None:
    # A short T1 makes the UDP INVITE give up (Timer B = 64*T1) in ~3 s instead of 32 s;
    # over TCP the refused connect() fails the call at once.
    a = phone_factory("a", transport=transport, t1_ms=50)

    a.call(f"sip:nobody@127.0.0.1:{_dead_port(transport)}{_tp(transport)}")

    end = a.wait_state("DISCONNECTED", timeout=20)
    assert end["code"] in (408, 503)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_with_dead_proxy_returns_failure_code(
    phone_factory: PhoneFactory, transport: Transport
) -> None:
    a = phone_factory("a", transport=transport, t1_ms=50)

    code = a.register(f"127.0.0.1:{_dead_port(transport)}", "a", "example.com", "pw", timeout=15)

    assert code in (408, 503)
    assert a.last_registration is not None
    assert not a.last_registration["active"]


def test_close_is_idempotent_and_commands_fail_after() -> None:
    phone = Phone("solo")
    phone.close()
    phone.close()
    with pytest.raises(PhoneError, match="closed"):
        phone.call("sip:x@127.0.0.1:5060")

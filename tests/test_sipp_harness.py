"""The SIPp harness on its own: SIPp talks to SIPp on 127.0.0.1, with no proxy."""

from __future__ import annotations

import os

import pytest

from tests.support.sipp import EXIT_FATAL, EXIT_SOME_FAILED, Sipp, Transport, free_port

pytestmark = pytest.mark.e2e

TRANSPORTS: list[Transport] = ["u1", "t1"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_uac_calls_uas(sipp: Sipp, transport: Transport) -> None:
    uas = sipp.start_uas(transport=transport)

    caller = sipp.call(uas.address, "bob", transport=transport, calls=20, rate=10)
    callee = uas.stop()

    assert caller.ok, caller.report()
    assert caller.successful == 20, caller.report()
    assert callee.ok, callee.report()
    assert callee.successful == 20, callee.report()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_flood_against_stub(sipp: Sipp, transport: Transport) -> None:
    stub = sipp.start_uas(transport=transport, scenario="registrar_stub.xml")
    users = [(f"user{n:04d}",) for n in range(200)]

    result = sipp.register(stub.address, users, transport=transport, rate=100)
    registrar = stub.stop()

    assert result.ok, result.report()
    assert result.successful == 200, result.report()
    assert registrar.successful == 200, registrar.report()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_answers_digest_challenge(sipp: Sipp, transport: Transport) -> None:
    stub = sipp.start_uas(
        transport=transport, scenario="registrar_stub_auth.xml", keys={"password": "secret"}
    )
    users = [(f"user{n:04d}", "secret") for n in range(50)]

    result = sipp.register(stub.address, users, transport=transport, rate=100)
    registrar = stub.stop()

    assert result.ok, result.report()
    assert result.successful == 50, result.report()
    assert registrar.ok, registrar.report()
    assert registrar.successful == 50, registrar.report()


def test_wrong_password_fails_registration(sipp: Sipp) -> None:
    stub = sipp.start_uas(scenario="registrar_stub_auth.xml", keys={"password": "secret"})

    result = sipp.register_contact(stub.address, "mallory", free_port(), password="guess")
    registrar = stub.stop()

    assert result.exit_code == EXIT_SOME_FAILED, result.report()
    assert (result.successful, result.failed) == (0, 1), result.report()
    assert registrar.failed == 1, registrar.report()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_contact_binds_the_given_port(sipp: Sipp, transport: Transport) -> None:
    stub = sipp.start_uas(transport=transport, scenario="registrar_stub.xml", trace_messages=True)
    port = free_port()

    result = sipp.register_contact(stub.address, "alice", port, transport=transport)
    stub.stop()
    uas = sipp.start_uas(transport=transport, port=port)  # the port is still free

    assert result.ok, result.report()
    params = ";transport=tcp" if transport == "t1" else ""
    contact = f"Contact: <sip:alice@127.0.0.1:{port}{params}>"
    assert contact in stub.logs.messages.read_text()
    assert uas.running()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_call_expecting_failure_checks_the_status(sipp: Sipp, transport: Transport) -> None:
    busy = sipp.start_uas(transport=transport, scenario="uas_busy.xml")

    rejected = sipp.call_expecting_failure(busy.address, "carol", 486, transport=transport, calls=5)
    wrong = sipp.call_expecting_failure(busy.address, "carol", 404, transport=transport, calls=2)
    callee = busy.stop()

    assert rejected.ok, rejected.report()
    assert rejected.successful == 5, rejected.report()
    assert (wrong.successful, wrong.failed) == (0, 2), wrong.report()
    assert 'wanted:"404"' in wrong.report()
    assert callee.successful == 7, callee.report()  # every rejection was ACKed


def test_call_to_silent_udp_port_fails(sipp: Sipp) -> None:
    result = sipp.call(
        ("127.0.0.1", free_port()), "nobody", calls=3, recv_timeout_ms=1000, timeout_s=10
    )

    assert not result.ok
    assert result.exit_code == EXIT_SOME_FAILED, result.report()
    assert result.failed == 3, result.report()
    assert "receive timeout" in result.report()


def test_call_to_closed_tcp_port_fails(sipp: Sipp) -> None:
    result = sipp.call(("127.0.0.1", free_port()), "nobody", transport="t1", timeout_s=10)

    assert not result.ok
    assert result.exit_code == EXIT_FATAL, result.report()
    assert "Connection refused" in result.report()


def test_wait_kills_sipp_at_its_deadline(sipp: Sipp) -> None:
    uas = sipp.start_uas()

    result = uas.wait(timeout=0.2)

    assert result.killed
    assert not result.ok
    assert not uas.running()


def test_close_kills_every_sipp(sipp: Sipp) -> None:
    processes = [sipp.start_uas(), sipp.start_uas(transport="t1")]

    sipp.close()

    for process in processes:
        assert not process.running()
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)  # the whole process group is gone

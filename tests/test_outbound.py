"""RFC 5626 outbound with real pjsua2 phones against a site built in this process (by
``proxy.site.build_site``, as ``p2psip run`` builds it), so that the test can reach into
its transport and kill a phone's connection from the proxy's side.

The phones' API blocks; it runs in threads while the site serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import stun
from proxy.config import Config, HostPort
from proxy.site import Site, build_site
from proxy.transport import Flow
from tests.support.phone import Phone, close_all

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
DOMAIN = "example.com"


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    config = Config(
        domains=(DOMAIN,), sip_listen=HostPort(HOST, 0), dht_listen=HostPort(HOST, 0),
        data_dir=tmp_path / "data", admin_token="t", nat_keepalive_interval=0,
    )  # fmt: skip
    site = await build_site(config)
    await site.start()
    yield site
    await site.close()


async def blocking(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a phone's blocking call off the loop the site serves on."""
    return await asyncio.to_thread(fn, *args, **kw)


async def flow_of(site: Site, user: str) -> Flow:
    [binding] = await site.store.load(f"sip:{user}@{DOMAIN}", time.time())
    return Flow.parse(binding.source)


def header(msg: str, name: str) -> list[str]:
    prefix = name.lower() + ":"
    return [
        line.split(":", 1)[1].strip()
        for line in msg.splitlines()
        if line.lower().startswith(prefix)
    ]


async def call_gets(caller: Phone, callee: Phone | None, target: str) -> int:
    """Call ``target``; the callee (if any) answers. Returns the caller's last status."""
    await blocking(caller.call, target)
    if callee is None:
        state = await blocking(caller.wait_state, "DISCONNECTED", 15)
        return int(state["code"])
    await blocking(callee.wait_incoming, 10)
    await blocking(callee.answer, 200)
    state = await blocking(caller.wait_state, "CONFIRMED", 10)
    await blocking(caller.hangup)
    await blocking(callee.wait_state, "DISCONNECTED", 10)
    return int(state["code"])


async def test_a_phone_whose_outbound_flow_dies_gets_430_until_it_registers_again(
    site: Site, phone_factory: Callable[..., Phone]
) -> None:
    proxy = f"{HOST}:{site.sip_port}"
    bob = await blocking(phone_factory, "bob", transport="tcp", outbound=True)
    alice = await blocking(phone_factory, "alice")
    assert await blocking(bob.register, proxy, "bob", DOMAIN, expires=600) == 200
    assert await blocking(alice.register, proxy, "alice", DOMAIN) == 200

    # The 200 as bob's phone got it: outbound is on, with the Flow-Timer for TCP, and
    # his contact comes back with his instance and reg-id.
    assert bob.last_registration is not None
    ok = bob.last_registration["msg"]
    assert header(ok, "Require") == ["outbound"]
    assert header(ok, "Flow-Timer") == [str(int(site.config.tcp_idle_timeout * 0.9))]
    [contact] = header(ok, "Contact")
    assert "+sip.instance=" in contact and "reg-id=1" in contact and ";ob" in contact

    # A call reaches bob over his connection.
    assert await call_gets(alice, bob, f"sip:bob@{DOMAIN}") == 200

    # The proxy drops bob's connection (as when a NAT forgets it).
    first = await flow_of(site, "bob")
    conn = site.server.transport.connections[(first.host, first.port)]
    assert conn.transport is not None
    conn.transport.abort()
    await asyncio.sleep(0.2)

    # The next call gets 430 at once: nothing is sent to bob's Contact some other way.
    assert await call_gets(alice, None, f"sip:bob@{DOMAIN}") == 430
    assert site.counters.flow_failed == 1

    # bob registers again (over a new connection), and calls reach him again.
    assert await blocking(bob.register, proxy, "bob", DOMAIN, expires=600) == 200
    second = await flow_of(site, "bob")
    assert second != first
    assert await call_gets(alice, bob, f"sip:bob@{DOMAIN}") == 200
    await blocking(close_all, [alice, bob])  # while the site still answers their goodbyes


async def test_a_phone_without_outbound_gets_no_require(
    site: Site, phone_factory: Callable[..., Phone]
) -> None:
    carol = await blocking(phone_factory, "carol", transport="tcp")
    assert await blocking(carol.register, f"{HOST}:{site.sip_port}", "carol", DOMAIN) == 200
    assert carol.last_registration is not None
    ok = carol.last_registration["msg"]
    assert header(ok, "Require") == []
    assert header(ok, "Flow-Timer") == []
    await blocking(close_all, [carol])


async def test_stun_keepalives_on_the_sip_port_are_answered(site: Site) -> None:
    # RFC 5626 §4.4.2: a Binding request on the SIP UDP port gets the address the proxy
    # sees; SIP on the same port goes on being SIP.
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        s.setblocking(False)
        tid = b"keepalive-01"
        await loop.sock_sendto(s, stun.binding_request(tid), (HOST, site.sip_port))
        reply = await asyncio.wait_for(loop.sock_recv(s, 2048), 2)
        msg = stun.decode(reply)
        assert msg.type == stun.BINDING_SUCCESS and msg.transaction_id == tid
        assert stun.mapped_address(msg) == s.getsockname()
        # Plain CRLF keep-alives get nothing back; an OPTIONS after them is answered.
        await loop.sock_sendto(s, b"\r\n\r\n", (HOST, site.sip_port))
        options = (
            f"OPTIONS sip:{HOST}:{site.sip_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{s.getsockname()[1]};branch=z9hG4bKstun1;rport\r\n"
            f"From: <sip:probe@{HOST}>;tag=1\r\nTo: <sip:{HOST}:{site.sip_port}>\r\n"
            "Call-ID: stun-then-sip\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        await loop.sock_sendto(s, options, (HOST, site.sip_port))
        answer = await asyncio.wait_for(loop.sock_recv(s, 65535), 2)
        assert answer.startswith(b"SIP/2.0 200")

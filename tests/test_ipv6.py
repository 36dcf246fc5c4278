"""IPv6: a site on ::1 whose pjsua2 phones register and call over IPv6 (UDP and TCP),
with [::1] in Via, Record-Route and Contact; and two sites on ::1 that join one DHT over
IPv6 and relay a call to each other's home proxy, sip:[::1]:PORT."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from dht_adaptor.keys import SiteKey, TrustStore, sign_binding
from dht_adaptor.node import DhtNode
from dht_adaptor.record import new_binding
from dht_adaptor.record_store import MemoryRecordStore

from .support.site import ROOT
from .support.site import Site as SiteProcess

pytestmark = pytest.mark.e2e

DOMAIN = "example.com"
V6 = "::1"


def free_port6() -> int:
    """A port free on ::1 for both UDP and TCP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
            u.bind((V6, 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as t:
                try:
                    t.bind((V6, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on ::1")


def options6(port: int, timeout: float) -> bytes | None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((V6, 0))
        lport = s.getsockname()[1]
        msg = (
            f"OPTIONS sip:[::1]:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP [::1]:{lport};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
            f"From: <sip:probe@[::1]>;tag={uuid.uuid4().hex[:8]}\r\n"
            f"To: <sip:[::1]:{port}>\r\nCall-ID: {uuid.uuid4().hex}\r\n"
            "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        s.settimeout(timeout)
        s.sendto(msg, (V6, port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


class V6Site(SiteProcess):
    """``p2psip run`` with its SIP, DHT and admin sockets on ::1."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        super().__init__(workdir, "127.0.0.1", args)
        self.host = V6
        self.port, self.dht_port, self.admin_port = free_port6(), free_port6(), free_port6()

    @property
    def sip(self) -> str:
        return f"[{V6}]:{self.port}"

    @property
    def dht(self) -> str:
        return f"[{V6}]:{self.dht_port}"

    @property
    def admin(self) -> str:
        return f"[{V6}]:{self.admin_port}"

    def start(self, timeout: float = 15.0) -> V6Site:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}
        env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"p2psip exited with {self.proc.returncode}:\n{self.log()}")
            reply = options6(self.port, 0.2)
            if reply is not None and reply.startswith(b"SIP/2.0 200"):
                return self
        raise RuntimeError(f"p2psip did not answer OPTIONS on ::1 in {timeout}s:\n{self.log()}")


def call(caller, callee, target: str) -> dict[str, object]:
    caller.call(target)
    incoming = callee.wait_incoming(timeout=15)
    callee.answer(200)
    a = caller.wait_state("CONFIRMED", timeout=15)
    b = callee.wait_state("CONFIRMED", timeout=15)
    assert a["call_id"] == b["call_id"]
    caller.hangup()  # the BYE follows the [::1] Record-Route
    callee.wait_state("DISCONNECTED", timeout=15)
    caller.wait_state("DISCONNECTED", timeout=15)
    return incoming


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_phones_register_and_call_over_ipv6(tmp_path: Path, phone_factory, transport) -> None:
    site = V6Site(tmp_path, ["--domain", DOMAIN]).start()
    try:
        alice = phone_factory("alice", transport=transport, bind_ip=V6)
        bob = phone_factory("bob", transport=transport, bind_ip=V6)
        assert alice.register(site.sip, "alice", DOMAIN) == 200
        assert bob.register(site.sip, "bob", DOMAIN) == 200
        assert f"@[::1]:{bob.port}" in str(bob.last_registration["msg"])  # its Contact
        incoming = call(alice, bob, f"sip:bob@{DOMAIN}")
        invite = str(incoming["msg"])
        assert f"Record-Route: <sip:[::1]:{site.port}" in invite
        assert f"Via: SIP/2.0/{transport.upper()} [::1]:{site.port};" in invite
        call(bob, alice, f"sip:alice@{DOMAIN}")
    finally:
        site.stop()


def _keygen(data: Path, trust: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "proxy.cli", "keygen", "--data-dir", str(data)],
        check=True, capture_output=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    trust.mkdir(exist_ok=True)
    (trust / f"{data.parent.name}.pub").write_text((data / "site.pub").read_text())


def _dht_homes(site: V6Site, user: str) -> list[str]:
    """The home proxies the site's own DHT node finds for ``user`` (admin API on ::1)."""
    token = (site.workdir / "data" / "admin.token").read_text().strip()
    request = urllib.request.Request(
        f"http://{site.admin}/dht/lookup/sip:{user}@{DOMAIN}",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return [b["home"] for b in json.load(resp)["bindings"]]
    except (OSError, ValueError):
        return []


def test_two_sites_join_the_dht_over_ipv6_and_relay_calls(tmp_path: Path, phone_factory) -> None:
    trust = tmp_path / "trust"
    for name in ("a", "b"):
        _keygen(tmp_path / name / "data", trust)
    common = ["--domain", DOMAIN, "--trust", str(trust)]
    a = V6Site(tmp_path / "a", [*common, "--site-id", "a"]).start()
    b = V6Site(tmp_path / "b", [*common, "--site-id", "b", "--bootstrap", a.dht])
    try:
        b.start()
        alice = phone_factory("alice", bind_ip=V6)
        bob = phone_factory("bob", bind_ip=V6)
        assert alice.register(a.sip, "alice", DOMAIN) == 200
        assert bob.register(b.sip, "bob", DOMAIN) == 200
        # bob's binding, stored over IPv6, names his home proxy as [::1].
        deadline = time.monotonic() + 15
        homes: list[str] = []
        while time.monotonic() < deadline and not homes:
            homes = _dht_homes(a, "bob")
            time.sleep(0.2)
        assert homes == [f"sip:[::1]:{b.port}"], a.log() + b.log()
        call(alice, bob, f"sip:bob@{DOMAIN}")
        call(bob, alice, f"sip:alice@{DOMAIN}")
    finally:
        b.stop()
        a.stop()


async def test_a_dual_stack_dht_node_joins_ipv4_and_ipv6_nodes() -> None:
    """``--dht-listen '[::]:6084'``: one node that IPv4-only and IPv6-only nodes both
    reach, and that carries records between them."""
    keys = [SiteKey.generate() for _ in range(3)]
    trust = TrustStore({k.key_id: k.public_bytes for k in keys})
    nodes = [DhtNode(MemoryRecordStore(trust), trust, key=k, rpc_timeout=0.3) for k in keys]
    dual, v4, v6 = nodes
    try:
        await dual.listen("::", 0)
        await v4.listen("127.0.0.1", 0)
        await v6.listen(V6, 0)
        assert await dual.bootstrap([("127.0.0.1", v4.address[1])]) == 1  # an IPv4 seed
        assert await v6.bootstrap([(V6, dual.address[1])]) == 1
        # Each single-stack node knows only what it can reach.
        assert {host for _, host, _ in v4.peers()} == {"127.0.0.1"}
        assert {host for _, host, _ in v6.peers()} == {V6}
        aor = "sip:bob@example.com"
        unsigned = new_binding(
            aor=aor, contact="sip:bob@[::1]:5062", home="sip:[::1]:5060", site="v6",
            version=1, now=time.time(), expires=3600,
        )  # fmt: skip
        binding = sign_binding(unsigned, keys[2])
        assert await v6.put(aor, [binding]) >= 2
        assert await v4.get(aor) == (binding,)  # through the dual-stack node
    finally:
        for node in nodes:
            await node.close()

"""A network partition: one site is cut off from the others, then healed.

Topology (tests/support/netns.py): three site namespaces, A (10.99.0.1), B (10.99.0.2)
and C (10.99.0.3), each plugged into a bridge in a fourth, ``hub`` namespace by a veth
pair. Each site namespace runs what its compose file would: a redis-server on its own
loopback, the ``dht`` and ``proxy`` services (tests/support/deployment.py, through
``ip netns exec``) on the compose file's ports, and its pjsua2 phones. B and C bootstrap
from A's DHT node, as the README's three-site deployment does.

Cutting B sets its port on the hub down: B still works inside (its phones register),
but no datagram crosses. A and C must keep calling each other, a call to B's user must
fail with a clean SIP error, and once the link is back calls to and from B must work
again, for users registered before and during the partition, and B's DHT nodes must
know nodes at the other sites again.

Needs root and iproute2 (``ip netns``); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import umsgpack

from dht_adaptor.keys import SiteKey, TrustStore
from dht_adaptor.membership import Member, open_datagram
from tests.support import netns
from tests.support.deployment import Deployment, SiteProcesses
from tests.support.phone import Phone, PhoneError, PhoneFactory, PhoneTimeout
from tests.support.site import ROOT

pytestmark = pytest.mark.e2e

DOMAIN = "example.com"
SITES = ("a", "b", "c")
# Nothing else listens inside a site's namespace: the compose file's own ports.
DHT_PORT, PROXY_DHT_PORT = 6084, 6085
COMPOSE_PORTS = (5060, DHT_PORT, PROXY_DHT_PORT, 8080)  # SIP, dht, proxy's DHT node, admin
T1 = 0.1  # seconds: the proxies' Timer B (64*T1) ends a call to a cut-off site in 6.4 s
CLEAN_FAILURES = {408, 480, 503}
HEALED_WITHIN = 10.0  # seconds after the link is back (a get retries known-dead contacts)
KEEP_JOINED_ROUND = 30.0  # proxy/app.py keep_joined bootstraps again this often


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with netns.lab(list(SITES)) as built:
        yield built


@dataclass
class Net:
    lab: netns.Lab
    deployment: Deployment
    sites: dict[str, SiteProcesses]

    def ns(self, name: str) -> netns.Netns:
        return self.lab.sites[name]


@pytest.fixture
def net(lab: netns.Lab, tmp_path: Path) -> Iterator[Net]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    deployment = Deployment(tmp_path, None, DOMAIN, tuning={"P2PSIP_T1": str(T1)})
    redis: list[netns.NetnsRedis] = []
    try:
        sites = {}
        for n, name in enumerate(SITES, start=1):
            ns = lab.sites[name]
            server = netns.NetnsRedis(ns, tmp_path / f"redis-{name}")
            redis.append(server)
            server.start()
            sites[name] = deployment.prepare(
                n, host=lab.hosts[name], ports=COMPOSE_PORTS, prefix=ns.prefix,
                probe=ns.call, redis_url=server.url,
            )  # fmt: skip
        first = sites[SITES[0]]
        for site in sites.values():
            deployment.start(site, [] if site is first else [first.dht])
        yield Net(lab, deployment, sites)
    finally:
        deployment.close()
        for server in redis:
            server.stop()


def phone(net: Net, phone_factory: PhoneFactory, site: str, user: str) -> Phone:
    """A phone in ``site``'s namespace, registered at that site's proxy as ``user``."""
    ns, host = net.ns(site), net.lab.hosts[site]
    p = phone_factory(user, bind_ip=host, command_prefix=ns.prefix)
    assert p.register(net.sites[site].sip, user, DOMAIN) == 200, p.log_tail()
    return p


def answer_and_hang_up(caller: Phone, callee: Phone) -> None:
    callee.wait_incoming(timeout=15)
    callee.answer(200)
    a = caller.wait_state("CONFIRMED", timeout=15)
    b = callee.wait_state("CONFIRMED", timeout=15)
    assert a["call_id"] == b["call_id"]
    caller.hangup()  # the BYE goes back through both proxies (Record-Route)
    callee.wait_state("DISCONNECTED", timeout=15)
    caller.wait_state("DISCONNECTED", timeout=15)


def call(caller: Phone, callee: Phone, user: str) -> None:
    caller.call(f"sip:{user}@{DOMAIN}")
    answer_and_hang_up(caller, callee)


def call_within(caller: Phone, callee: Phone, user: str, within: float) -> list[int]:
    """Call ``user`` again and again until the callee rings, for at most ``within``
    seconds; then answer and hang up. Returns the codes of the calls that failed first."""
    deadline = time.monotonic() + within
    failures = []
    while True:
        caller.call(f"sip:{user}@{DOMAIN}")
        try:
            caller.wait_state("EARLY", timeout=64 * T1 + 15)  # the callee rings (180)
        except PhoneTimeout:
            raise
        except PhoneError:  # the call ended first
            failures.append(int(caller.call_states()[-1]["code"]))
            assert time.monotonic() < deadline, f"{user} unreachable: {failures}"
            time.sleep(1.0)
            continue
        answer_and_hang_up(caller, callee)
        return failures


def failed_call(caller: Phone, user: str) -> int:
    """Call ``user``; the call must end without being answered. Returns its final code."""
    caller.call(f"sip:{user}@{DOMAIN}")
    end = caller.wait_state("DISCONNECTED", timeout=64 * T1 + 15)
    assert "CONFIRMED" not in {e["state"] for e in caller.call_states()}
    return int(end["code"])


def lookup(net: Net, site: str, user: str) -> set[str] | None:
    """The home proxies the DHT holds for ``user``, asked from ``site`` (p2psip lookup,
    through the site's own DHT node)."""
    proc = subprocess.run(
        [
            *net.ns(site).prefix, sys.executable, "-m", "proxy.cli", "lookup",
            f"sip:{user}@{DOMAIN}", "--bootstrap", net.sites[site].dht,
            "--trust", str(net.deployment.trust_dir), "--data-dir", str(net.sites[site].data_dir),
            "--timeout", "5",
        ],
        capture_output=True, text=True, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin")},
    )  # fmt: skip
    if proc.returncode == 1:
        return None
    assert proc.returncode == 0, proc.stderr
    return {b["home"] for b in json.loads(proc.stdout)["bindings"]}


def home(site: SiteProcesses) -> str:
    return f"sip:{site.host}:{site.sip_port}"


def wait_found(net: Net, site: str, user: str, homes: set[str]) -> None:
    """Wait until the DHT, asked from ``site``, holds ``user`` at exactly ``homes``.
    (Only used while the sites asked about are reachable: a lookup repairs what it
    reads, so it would heal records by itself.)"""
    deadline = time.monotonic() + 10
    seen = None
    while time.monotonic() < deadline:
        seen = lookup(net, site, user)
        if seen == homes:
            return
        time.sleep(0.3)
    raise AssertionError(f"{user} not found at {homes} from {site}: {seen}")


def service_sites(hosts: dict[str, str], contacts: list[tuple[str, int]]) -> set[str]:
    """The sites whose ``dht`` or proxy DHT nodes are among ``contacts`` (host, port);
    short-lived nodes (p2psip lookup, these probes) are left out."""
    site_of = {host: name for name, host in hosts.items()}
    return {site_of[h] for h, p in contacts if h in site_of and p in (DHT_PORT, PROXY_DHT_PORT)}


def dht_rpc(net: Net, site: str, node: tuple[str, int], rpc: str, *args: bytes) -> object:
    """One RPC to the DHT node at ``node``, sent from inside ``site``; None if no answer.

    rpcudp framing: 0x00, a message id, msgpack [name, [sender id, *args]]; the answer
    is 0x01, the same id, msgpack result. The node takes the sender for a new contact
    (a dead one once the socket is gone), as it does every short-lived p2psip node.
    """

    member = Member(SiteKey.load(net.sites[site].data_dir), os.urandom(8))
    trust = TrustStore.from_dir(net.deployment.trust_dir, None)

    def ask() -> object:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((net.lab.hosts[site], 0))
            s.settimeout(2.0)
            msg_id = os.urandom(20)
            request = b"\x00" + msg_id + umsgpack.packb([rpc, [member.node_id, *args]])
            s.sendto(member.seal(request, time.time()), node)
            try:
                while True:
                    data = open_datagram(s.recv(65535), trust, time.time()).datagram
                    if data[:1] == b"\x01" and data[1:21] == msg_id:
                        return umsgpack.unpackb(data[21:])
            except TimeoutError:
                return None

    return net.ns(site).call(ask)


def answers(net: Net, site: str, node: tuple[str, int]) -> bool:
    """Does the DHT node at ``node`` answer a ping sent from inside ``site``?

    (Not ``p2psip ping``: it also waits for a lookup through the node, which fails while
    the node's routing table holds unreachable contacts; see the report.)
    """
    return dht_rpc(net, site, node, "ping") is not None


def known_sites(net: Net, site: str, port: int) -> set[str]:
    """The sites the DHT node ``site``:``port`` has in its routing table: its answer to
    a find_node holds every contact while the overlay has fewer than k (20) nodes."""
    answer = dht_rpc(net, site, (net.lab.hosts[site], port), "find_node", os.urandom(20))
    assert isinstance(answer, list), answer
    return service_sites(net.lab.hosts, [(e[1], e[2]) for e in answer])


def test_a_site_cut_off_keeps_working_and_comes_back(net: Net, phone_factory: PhoneFactory) -> None:
    a, b, c = (net.sites[n] for n in SITES)
    alice = phone(net, phone_factory, "a", "alice")
    bob = phone(net, phone_factory, "b", "bob")
    carol = phone(net, phone_factory, "c", "carol")
    wait_found(net, "a", "bob", {home(b)})
    wait_found(net, "a", "carol", {home(c)})
    call(alice, carol, "carol")
    call(alice, bob, "bob")

    net.lab.cut("b")
    call(carol, alice, "alice")
    andy = phone(net, phone_factory, "a", "andy")  # new users on both sides of the cut
    bert = phone(net, phone_factory, "b", "bert")
    wait_found(net, "c", "andy", {home(a)})
    call(carol, andy, "andy")
    assert failed_call(alice, "bob") in CLEAN_FAILURES
    b_dht, b_proxy_dht = (b.host, b.dht_port), (b.host, b.proxy_dht_port)
    assert not answers(net, "a", b_dht)
    assert answers(net, "b", b_dht)  # B still works inside
    assert answers(net, "a", (c.host, c.dht_port))
    # The overlay saw the cut: the proxies' nodes, which stored andy and bert, dropped
    # the far side. (The standalone dht nodes send nothing by themselves: they keep it.)
    assert known_sites(net, "b", b.proxy_dht_port) == {"b"}
    assert known_sites(net, "a", a.proxy_dht_port) == {"a", "c"}

    net.lab.heal("b")
    assert answers(net, "a", b_dht)
    assert answers(net, "c", b_proxy_dht)
    call(alice, bob, "bob")  # every site held bob's record from before the cut
    # Records written during the cut live on one side only, until the halves meet again.
    call_within(alice, bert, "bert", HEALED_WITHIN)
    call_within(bert, andy, "andy", HEALED_WITHIN)
    call(carol, bert, "bert")
    # B is back in the overlay: each of its DHT nodes has peers at other sites again,
    # at the latest after one round of keep_joined (proxy/app.py) or traffic since.
    for port in (b.proxy_dht_port, b.dht_port):
        deadline = time.monotonic() + KEEP_JOINED_ROUND + 15
        while not known_sites(net, "b", port) - {"b"}:
            assert time.monotonic() < deadline, f"B's node on {port} knows only B"
            time.sleep(1.0)


def test_overlay_joins_again_after_every_node_dropped_the_far_side(lab: netns.Lab) -> None:
    """The long partition: the DHT nodes as the sites run them (``dht`` and the proxy's,
    each kept joined by proxy/app.py ``keep_joined`` with the compose bootstrap lists),
    in-process on an event loop inside each site's namespace.

    During a partition of more than a few minutes every node drops the far side's nodes:
    its republish (every 10 minutes) and bucket refresh are lookups, and an unanswered
    RPC evicts the contact. One lookup per node does here what those timers would do.
    Once the link is back the halves must find each other again, on their own.
    """
    from dht_adaptor.keys import TrustStore
    from dht_adaptor.node import DhtError, DhtNode
    from dht_adaptor.record_store import MemoryRecordStore
    from proxy.app import keep_joined
    from proxy.config import Config, HostPort

    key = SiteKey.generate()
    trust = TrustStore({key.key_id: key.public_bytes})
    loops: dict[str, netns.NetnsLoop] = {}
    nodes: dict[tuple[str, int], DhtNode] = {}
    joiners: list[tuple[str, asyncio.Task[None]]] = []
    first = HostPort(lab.hosts[SITES[0]], DHT_PORT)

    async def start(name: str, port: int, bootstrap: tuple[HostPort, ...]) -> DhtNode:
        node = DhtNode(MemoryRecordStore(trust), trust, key=key)
        await node.listen(lab.hosts[name], port)
        if bootstrap:  # as proxy/app.py joined(): no bootstrap, no keep_joined
            joined = keep_joined(node, Config(bootstrap=bootstrap))
            joiners.append((name, asyncio.get_running_loop().create_task(joined)))
        return node

    async def peers(node: DhtNode) -> list[tuple[str, int]]:
        return [(h, p) for _, h, p in node.peers()]

    async def look_around(node: DhtNode) -> None:
        with contextlib.suppress(DhtError):
            await node.get(f"sip:nobody@{DOMAIN}")
        await asyncio.sleep(1.0)  # the unanswered RPCs time out (0.5 s) and evict

    def sites_known(name: str) -> set[str]:
        return set.union(
            *(
                service_sites(lab.hosts, loops[n].run(peers(node)))
                for (n, _), node in nodes.items()
                if n == name
            )
        )

    def everyone_looks_around() -> None:
        looking = [loops[name].submit(look_around(node)) for (name, _), node in nodes.items()]
        for future in looking:
            future.result(30)

    try:
        for name in SITES:
            loop = loops[name] = netns.NetnsLoop(lab.sites[name])
            dht = HostPort(lab.hosts[name], DHT_PORT)
            others = () if dht == first else (first,)
            nodes[name, DHT_PORT] = loop.run(start(name, DHT_PORT, others))
            nodes[name, PROXY_DHT_PORT] = loop.run(start(name, PROXY_DHT_PORT, (dht, *others)))
        deadline = time.monotonic() + 20
        while not all(sites_known(n) == set(SITES) for n in SITES):
            assert time.monotonic() < deadline, {n: sites_known(n) for n in SITES}
            everyone_looks_around()

        lab.cut("b")
        # A node drops a contact once a timeout is confirmed by a second, slower ping, so
        # it takes a few rounds of lookups for every node to drop the far side.
        split = {"a": {"a", "c"}, "b": {"b"}, "c": {"a", "c"}}
        deadline = time.monotonic() + 60
        while (seen := {n: sites_known(n) for n in SITES}) != split:
            assert time.monotonic() < deadline, f"the far side was not dropped: {seen}"
            everyone_looks_around()

        lab.heal("b")
        deadline = time.monotonic() + KEEP_JOINED_ROUND + 15
        while (seen := {n: sites_known(n) for n in SITES}) != {n: set(SITES) for n in SITES}:
            assert time.monotonic() < deadline, f"the overlay stayed split after the heal: {seen}"
            everyone_looks_around()
    finally:
        for name, task in joiners:
            loops[name].loop.call_soon_threadsafe(task.cancel)
        for (name, _), node in nodes.items():
            with contextlib.suppress(Exception):
                loops[name].run(node.close(), 10)
        for loop in loops.values():
            loop.close()

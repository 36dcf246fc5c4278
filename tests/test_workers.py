"""``p2psip run --workers N``: worker processes sharing the SIP ports (proxy.workers).

The links between workers (proxy.siblings) are checked in one process over real
loopback sockets; the rest runs the real command with a real redis-server and real
pjsua2 phones: calls over UDP and TCP, a call to a phone whose TCP connection the other
worker holds, a worker killed and started again, and SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from dht_adaptor.adaptor import TooManyBindings
from proxy.config import ConfigError, build_config, cores
from proxy.siblings import (
    WORKER_PARAM,
    Handlers,
    LinkError,
    Located,
    Siblings,
    WorkerPlan,
    WorkerSockets,
    pack,
    unpack,
    worker_identity,
)
from proxy.sip.binding import Binding
from proxy.sip.forwarding import ProxyIdentity
from proxy.sip.message import Response, parse_message
from proxy.transport import Flow, shared_listeners, shared_sockets
from proxy.worker_dht import RemoteAdaptor
from proxy.workers import bind_sockets
from tests.support.site import Site, sip_options
from tests.test_multisite import call

DOMAIN = "example.com"


# --- configuration ----------------------------------------------------------------------


def test_workers_default_to_one_and_auto_means_the_cores() -> None:
    assert build_config({}, env={}).workers == 1
    redis = {"redis_url": "redis://127.0.0.1:6379/0"}
    assert build_config({**redis, "workers": "auto"}, env={}).workers == cores()
    assert build_config({**redis, "workers": "0"}, env={}).workers == cores()
    assert build_config({**redis}, env={"P2PSIP_WORKERS": "3"}).workers == 3


def test_several_workers_need_redis() -> None:
    with pytest.raises(ConfigError, match="--redis-url"):
        build_config({"workers": "2"}, env={})
    with pytest.raises(ConfigError, match="workers"):
        build_config({"workers": "-1"}, env={})


def test_workers_without_redis_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from tests.test_cli import assert_one_line_error, p2psip

    proc = p2psip("run", "--workers", "2", "--data-dir", str(tmp_path),
                  "--sip-listen", "127.0.0.1:0")  # fmt: skip
    assert_one_line_error(proc, "--redis-url")


# --- sockets ----------------------------------------------------------------------------


def test_shared_sockets_put_every_worker_on_one_port() -> None:
    pairs = shared_sockets("127.0.0.1", 0, 3)
    tls = shared_listeners("127.0.0.1", 0, 3)
    try:
        port = pairs[0][0].getsockname()[1]
        assert {s.getsockname()[1] for pair in pairs for s in pair} == {port}
        assert len({s.getsockname()[1] for s in tls}) == 1
        # Any worker's socket sends from the site's port: a NAT sees one source.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
            phone.bind(("127.0.0.1", 0))
            phone.settimeout(2)
            for udp, _ in pairs:
                udp.sendto(b"ping", phone.getsockname())
                assert phone.recvfrom(100)[1] == ("127.0.0.1", port)
    finally:
        for udp, tcp in pairs:
            udp.close()
            tcp.close()
        for s in tls:
            s.close()


def test_a_port_in_use_is_a_startup_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        config = build_config(
            {"sip_listen": f"127.0.0.1:{port}", "redis_url": "redis://127.0.0.1:1/0",
             "workers": "2", "data_dir": str(tmp_path)}, env={},
        )  # fmt: skip
        with pytest.raises(Exception, match="cannot listen on"):
            bind_sockets(config, 2)


# --- the links between workers, in one process ------------------------------------------


class _Worker:
    """One side of the links: what its handlers were asked to do."""

    def __init__(self, plan: WorkerPlan, me: ProxyIdentity) -> None:
        self.siblings = Siblings(plan)
        self.held: set[Flow] = set()
        self.sent: list[tuple[Flow, bytes]] = []
        self.delivered: list[tuple[bytes, Flow]] = []
        self.learnt: list[tuple[str, str]] = []
        self.changed: list[str] = []
        self.handlers = Handlers(
            identity=worker_identity(me, plan.index),
            holds=self.held.__contains__,
            send_held=self._send_held,
            deliver=lambda data, flow: self.delivered.append((data, flow)),
            learn_flow=lambda c, f: self.learnt.append((c, f)),
        )

    def _send_held(self, flow: Flow, data: bytes) -> bool:
        if flow not in self.held:
            return False
        self.sent.append((flow, data))
        return True


def _plans(count: int) -> list[WorkerPlan]:
    secret = os.urandom(32)
    links = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.setblocking(False)
        links.append(s)
    ports = tuple(s.getsockname()[1] for s in links)
    # Only the link listener is used here (the SIP sockets are the site's business).
    return [
        WorkerPlan(i, count, WorkerSockets(link, link, link, link), ports, secret)
        for i, link in enumerate(links)
    ]


async def _until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


ME = ProxyIdentity("127.0.0.1", 5060, (DOMAIN,))


@pytest.fixture
async def pair() -> AsyncIterator[list[_Worker]]:
    plans = _plans(2)
    workers = [_Worker(p, ME) for p in plans]
    for w in workers:
        await w.siblings.start(w.handlers)
    await _until(lambda: all(len(w.siblings._out) == 1 for w in workers))
    yield workers
    for w in workers:
        await w.siblings.close()


def test_frames_pack_and_unpack() -> None:
    assert unpack(pack(b"", b"abc", bytes(300))) == [b"", b"abc", bytes(300)]
    with pytest.raises(ValueError):
        unpack(pack(b"abc")[:-1])


def test_the_via_names_the_worker() -> None:
    via = worker_identity(ME, 3).via("udp", "z9hG4bK-x")
    assert via.endswith(f";{WORKER_PARAM}=3") and "branch=z9hG4bK-x" in via
    assert worker_identity(ME, 3).is_my_via("127.0.0.1", 5060)


async def test_a_connection_held_by_one_worker_carries_what_the_other_sends(pair) -> None:
    w0, w1 = pair
    flow = Flow("tcp", "127.0.0.1", 40000)
    w1.held.add(flow)
    w1.siblings.flow_noted("sip:bob@127.0.0.1:5070;transport=tcp", str(flow))
    await _until(lambda: w0.siblings.holds("127.0.0.1", 40000))
    assert w0.learnt == [("sip:bob@127.0.0.1:5070;transport=tcp", str(flow))]
    assert w0.siblings.send(flow, b"INVITE ...")
    await _until(lambda: bool(w1.sent))
    assert w1.sent == [(flow, b"INVITE ...")]
    # Not for a UDP flow, nor a TLS one on that address.
    assert not w0.siblings.send(Flow("udp", "127.0.0.1", 40000), b"x")
    assert not w0.siblings.send(Flow("tls", "127.0.0.1", 40000), b"x")
    # Closed there: no longer held anywhere.
    w1.siblings.flow_closed(flow)
    await _until(lambda: not w0.siblings.holds("127.0.0.1", 40000))


def _response(via: str) -> Response:
    raw = (
        "SIP/2.0 180 Ringing\r\n"
        f"Via: {via}\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKcaller\r\n"
        "From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
        "Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    msg = parse_message(raw)
    assert isinstance(msg, Response)
    return msg


async def test_a_response_goes_to_the_worker_whose_via_it_carries(pair) -> None:
    w0, w1 = pair
    mine = worker_identity(ME, 0).via("udp", "z9hG4bK-abc")
    assert w1.siblings.take_response(_response(mine))
    await _until(lambda: bool(w0.delivered))
    data, _flow = w0.delivered[0]
    assert parse_message(data).top_via.branch == "z9hG4bK-abc"  # type: ignore[union-attr]
    # Its own, unmarked, or another proxy's Via: handled where it landed.
    assert not w0.siblings.take_response(_response(mine))
    assert not w1.siblings.take_response(_response(ME.via("udp", "z9hG4bK-abc")))
    other = worker_identity(ProxyIdentity("192.0.2.1", 5060), 0).via("udp", "z9hG4bK-abc")
    assert not w1.siblings.take_response(_response(other))


async def test_worker_0_looks_up_and_publishes_for_the_others(pair) -> None:
    w0, w1 = pair

    async def locate(aor: str) -> Located:
        return Located(True, b'{"v":1,"b":[]}')

    w0.handlers.locate = locate
    w0.handlers.changed = w0.changed.append
    remote = RemoteAdaptor(w1.siblings, "0123456789abcdef", site_id="s", home="sip:127.0.0.1:5060")
    found = await remote.locate("sip:bob@example.com")
    assert found.known and found.bindings == ()
    now = time.time()
    b = Binding("sip:bob@example.com", "sip:bob@127.0.0.1:5070", now + 300, source="udp:1:2")
    remote.publish(remote.prepare("sip:bob@example.com", [b]))
    await _until(lambda: w0.changed == ["sip:bob@example.com"])
    many = [
        Binding("sip:bob@example.com", f"sip:bob-{n}-{'x' * 200}@127.0.0.1", now + 300)
        for n in range(60)
    ]
    with pytest.raises(TooManyBindings):
        remote.prepare("sip:bob@example.com", many)


async def test_a_lookup_fails_fast_when_worker_0_is_away() -> None:
    plans = _plans(2)
    plans[0].sockets.link.close()  # worker 0 is not there
    lone = _Worker(plans[1], ME)
    await lone.siblings.start(lone.handlers)
    try:
        with pytest.raises(LinkError):
            await lone.siblings.locate("sip:bob@example.com", 1.0)
    finally:
        await lone.siblings.close()


async def test_a_link_without_the_secret_is_closed(pair) -> None:
    w0, _w1 = pair
    port = w0.siblings._plan.link_ports[0]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hello = pack(b"1", bytes(32))
    writer.write(len(hello).to_bytes(4, "big") + b"\x01" + hello)
    hold = pack(b"tcp:127.0.0.1:41000")
    writer.write(len(hold).to_bytes(4, "big") + b"\x05" + hold)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed on us
    writer.close()
    assert not w0.siblings.holds("127.0.0.1", 41000)


# --- the real command -------------------------------------------------------------------


class WorkerSite(Site):
    """``p2psip run --workers N`` with Redis; knows which worker did what from its log."""

    def __init__(self, workdir: Path, redis_url: str, workers: int = 2) -> None:
        super().__init__(workdir, args=["--workers", str(workers), "--redis-url", redis_url,
                                        "--domain", DOMAIN])  # fmt: skip
        self.count = workers

    def start(self, timeout: float = 30.0) -> WorkerSite:
        super().start(timeout)
        self.wait_log(lambda text: all(f"worker {i} ready" in text for i in range(self.count)))
        return self

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, check: Callable[[str], bool], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if check(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"not in the log within {timeout}s:\n{self.log()}")

    def pids(self) -> dict[int, int]:
        """The latest pid of each worker."""
        found = re.findall(r"worker (\d+) started: pid (\d+)", self.text())
        return {int(i): int(pid) for i, pid in found}

    def registered_by(self, user: str) -> int:
        """The worker that took ``user``'s latest REGISTER."""
        pattern = rf" w(\d+) INFO proxy.registrar_service: registered sip:{user}@{DOMAIN} "
        text = self.wait_log(lambda t: re.search(pattern, t) is not None)
        return int(re.findall(pattern, text)[-1])

    def final_stats(self) -> dict[int, dict[str, float]]:
        out = {}
        for i, text in re.findall(r" w(\d+) INFO proxy.app: stats: (\{.*\})", self.text()):
            out[int(i)] = json.loads(text)  # the last line of each worker wins
        return out


@pytest.fixture
def worker_site(tmp_path: Path, redis_server) -> Iterator[WorkerSite]:
    site = WorkerSite(tmp_path, redis_server.url)
    try:
        yield site.start()
    finally:
        site.stop()


def _phone_on(site: WorkerSite, phone_factory, worker: int, user: str, transport: str = "udp"):
    """A phone registered as ``user`` whose REGISTER landed on ``worker``. The kernel
    picks the worker by the phone's port: new phones are tried until one lands there
    (each has one chance in ``site.count``)."""
    for attempt in range(16):
        phone = phone_factory(f"{user}{attempt}", transport=transport)
        assert phone.register(site.sip, user, DOMAIN) == 200
        if site.registered_by(user) == worker:
            return phone
        assert phone.unregister() == 200
        phone.close()
    raise AssertionError(f"no {transport} phone of 16 landed on worker {worker}")


@pytest.mark.e2e
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_phones_register_and_call_through_two_workers(worker_site, phone_factory, transport):
    alice = phone_factory("alice", transport=transport)
    bob = phone_factory("bob", transport=transport)
    assert alice.register(worker_site.sip, "alice", DOMAIN) == 200
    assert bob.register(worker_site.sip, "bob", DOMAIN) == 200
    call(alice, bob, f"sip:bob@{DOMAIN}")
    call(bob, alice, f"sip:alice@{DOMAIN}")


@pytest.mark.e2e
def test_a_call_reaches_a_tcp_phone_whose_connection_the_other_worker_holds(
    worker_site, phone_factory
) -> None:
    bob = phone_factory("bob", transport="tcp")
    assert bob.register(worker_site.sip, "bob", DOMAIN) == 200
    holder = worker_site.registered_by("bob")
    alice = _phone_on(worker_site, phone_factory, 1 - holder, "alice")
    call(alice, bob, f"sip:bob@{DOMAIN}")  # INVITE, ACK and BYE over bob's connection
    call(bob, alice, f"sip:alice@{DOMAIN}")  # alice answers the worker her port goes to
    assert worker_site.stop() == 0
    stats = worker_site.final_stats()
    # Worker 1-holder routed the calls; the holder wrote them to bob's connection.
    assert stats[1 - holder]["workers_sent_via_sibling"] >= 3
    assert stats[holder]["workers_sent_for_sibling"] >= 3
    assert stats[holder]["workers_dropped"] == stats[1 - holder]["workers_dropped"] == 0
    # And the phones' answers came back to the worker that sent each request.
    assert stats[0]["workers_responses_taken"] + stats[1]["workers_responses_taken"] > 0


@pytest.mark.e2e
def test_a_killed_worker_is_started_again_and_registrations_survive(
    worker_site, phone_factory
) -> None:
    alice = _phone_on(worker_site, phone_factory, 0, "alice")
    bob = _phone_on(worker_site, phone_factory, 1, "bob")
    for victim in (1, 0):  # worker 0 runs the DHT node and the admin API as well
        pid = worker_site.pids()[victim]
        os.kill(pid, signal.SIGKILL)
        worker_site.wait_log(lambda t, v=victim, p=pid: worker_site.pids()[v] != p
                             and t.count(f"worker {v} ready") >= 2)  # fmt: skip
        assert worker_site.alive()
        # The same sockets: each phone still lands on the same worker, which reads its
        # binding from Redis.
        call(alice, bob, f"sip:bob@{DOMAIN}")
        call(bob, alice, f"sip:alice@{DOMAIN}")
    assert "exited (signal SIGKILL): starting it again" in worker_site.text()


@pytest.mark.e2e
def test_sigterm_stops_every_worker_and_exits_0(worker_site) -> None:
    pids = worker_site.pids()
    assert sip_options("127.0.0.1", worker_site.port, 2.0) is not None
    assert worker_site.stop() == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "all workers stopped" in worker_site.text()

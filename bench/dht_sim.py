"""The overlay beyond this machine: real DhtNodes on a simulated network, in simulated time.

Every node is a real :class:`dht_adaptor.node.DhtNode` (its routing table, the
``IterativeLookup`` with its k, alpha, hedging and termination rule, quorums, dead
contacts, replication), driven on one :class:`VirtualLoop`: an asyncio event loop whose
clock jumps to the next timer instead of waiting for it, and whose datagram endpoints are
:class:`SimNetwork` ports, not sockets. A datagram reaches its port after a one-way delay
taken from the two hosts' places on a plane (so delays obey the triangle inequality)
plus jitter, or is lost with probability ``--loss``. Processing costs no simulated time:
latencies here are network round trips only, and CPU is measured by bench/dht_scale.py.

Measured per operation, on the node that issues it (``Trace``, via the protocol's
``call_find_node``/``call_find_value``/``call_store``, the calls IterativeLookup makes):
RPCs, timeouts, and *hops*: the originator learns each contact from some answer, so a
contact has a depth (1 for those in its routing table, one more than the node whose answer
first listed it). ``hops`` is the deepest contact that answered, ``value hops`` the
shallowest that returned a value: sequential round trips on the lookup's critical path.

Phases: build (every node joins via a random earlier one, in waves, then once more via a
random node), puts, gets of every key from random other nodes, then 20% of the nodes
killed (their ports vanish: a crash) and gets at a steady rate for ``--churn-seconds`` of
simulated time, reported per ``--bucket``.

Cryptography is not what is simulated: by default signatures are 64 zero bytes that
verify (``SiteKey.sign``/``TrustStore.verify_signature`` replaced in this process) and
peer sessions are off, so every datagram carries the same header as a signed one.
``--real-crypto`` keeps both (slow: an Ed25519 signature and check per pair of nodes).

Run:  .venv/bin/python bench/dht_sim.py --nodes 10000          # a few minutes
      .venv/bin/python bench/dht_sim.py --nodes 200 --gets 100  # seconds
Not a test (tests/test_dht_simulation.py runs a small one): bench/README.md and
docs/scale-model.md record results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import logging
import math
import random
import selectors
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dht_adaptor.errors import DhtError
from dht_adaptor.keys import SiteKey, TrustStore, sign_binding
from dht_adaptor.node import DhtNode
from dht_adaptor.protocol import NodeProtocol
from dht_adaptor.record import DhtBinding, RecordError, new_binding
from dht_adaptor.record_store import MemoryRecordStore

log = logging.getLogger("dht_sim")

PORT = 4000
DOMAIN = "sim.example.com"
EPOCH = 1_800_000_000.0  # wall-clock seconds at simulated time 0
Address = tuple[str, int]
Json = dict[str, Any]


# -- simulated time -----------------------------------------------------------------------


class SimulationStalled(RuntimeError):
    """The loop would wait for I/O with no timer pending: nothing can ever happen."""


class _NoSelector(selectors.BaseSelector):
    """A selector with nothing to select: waiting ``timeout`` moves the clock instead."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, id(fileobj), events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationStalled("no timer pending and no I/O to wait for")
        self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on simulated time whose datagram endpoints are SimNetwork ports."""

    def __init__(self, network: SimNetwork) -> None:
        self._now = 0.0
        self.network = network
        super().__init__(selector=_NoSelector(self))
        network.loop = self

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        # Always a little, as a real clock moves on by itself: code that waits until
        # ``sent + patience`` and then checks ``now - sent >= patience`` would otherwise
        # spin for ever when the two roundings disagree.
        self._now = max(self._now + max(seconds, 0.0), math.nextafter(self._now, math.inf))

    def wall(self) -> float:
        """Wall-clock time of this simulation (for signatures and record expiry)."""
        return EPOCH + self._now

    # No self-pipe: nothing calls in from other threads.
    def _make_self_pipe(self) -> None:
        pass

    def _close_self_pipe(self) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    async def create_datagram_endpoint(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.DatagramProtocol],
        local_addr: Address | None = None,
        remote_addr: Address | None = None,
        **kwargs: Any,
    ) -> tuple[SimTransport, asyncio.DatagramProtocol]:
        if local_addr is None:
            raise ValueError("a simulated endpoint needs its (host, port)")
        protocol = protocol_factory()
        transport = self.network.attach((local_addr[0], local_addr[1] or PORT), protocol)
        protocol.connection_made(transport)
        return transport, protocol


class _FakeSocket:
    family = socket.AF_INET


class SimTransport(asyncio.DatagramTransport):
    """One port of the simulated network."""

    def __init__(self, network: SimNetwork, address: Address, protocol: Any) -> None:
        super().__init__()
        self._network = network
        self.address = address
        self.protocol = protocol
        self._closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if not self._closing:
            self._network.send(self.address, bytes(data), (addr[0], int(addr[1])))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.address
        if name == "socket":
            return _FakeSocket()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._network.detach(self.address)
            self._network.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


@dataclasses.dataclass
class NetworkStats:
    datagrams: int = 0
    lost: int = 0  # by --loss
    unreachable: int = 0  # to a port that is gone (a dead node)
    bytes: int = 0


class SimNetwork:
    """Datagrams between ports, delayed by distance plus jitter, lost at random.

    Each host sits at a random point of the unit square; one way takes
    ``base + span * distance + jitter`` (jitter exponential with mean ``jitter``), so
    hosts far apart are far in time, and no path is shorter than through a third host.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        loss: float = 0.0,
        base: float = 0.002,
        span: float = 0.060,
        jitter: float = 0.001,
    ) -> None:
        self.rng = rng
        self.loss = loss
        self.base, self.span, self.jitter = base, span, jitter
        self.loop: VirtualLoop
        self.ports: dict[Address, SimTransport] = {}
        self.places: dict[str, tuple[float, float]] = {}
        self.stats = NetworkStats()

    def attach(self, address: Address, protocol: Any) -> SimTransport:
        if address in self.ports:
            raise OSError(f"address {address} in use")
        self.places.setdefault(address[0], (self.rng.random(), self.rng.random()))
        transport = SimTransport(self, address, protocol)
        self.ports[address] = transport
        return transport

    def detach(self, address: Address) -> None:
        self.ports.pop(address, None)

    def delay(self, a: str, b: str) -> float:
        (ax, ay), (bx, by) = self.places[a], self.places[b]
        distance = math.hypot(ax - bx, ay - by)
        return self.base + self.span * distance + self.rng.expovariate(1 / self.jitter)

    def send(self, source: Address, data: bytes, target: Address) -> None:
        self.stats.datagrams += 1
        self.stats.bytes += len(data)
        if target not in self.ports:
            self.stats.unreachable += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self.stats.lost += 1
            return
        self.loop.call_later(self.delay(source[0], target[0]), self._deliver, source, data, target)

    def _deliver(self, source: Address, data: bytes, target: Address) -> None:
        port = self.ports.get(target)
        if port is None:
            self.stats.unreachable += 1
            return
        port.protocol.datagram_received(data, source)


# -- what one operation did ---------------------------------------------------------------


@dataclasses.dataclass
class Trace:
    """The RPCs one node made for one put or get (see the module docstring for hops)."""

    depth: dict[bytes, int] = dataclasses.field(default_factory=dict)
    finds: int = 0
    stores: int = 0
    failed: int = 0  # calls that timed out or were refused
    hops: int = 0
    value_hops: int | None = None

    @property
    def rpcs(self) -> int:
        return self.finds + self.stores


TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("TRACE", default=None)


def _traced_finder(call: Callable[..., Awaitable[tuple[bool, Any]]]) -> Callable[..., Any]:
    async def traced(
        self: Any, node_to_ask: Any, node_to_find: Any, *, revive: bool = False
    ) -> tuple[bool, Any]:
        trace = TRACE.get()
        if trace is None:
            return await call(self, node_to_ask, node_to_find, revive=revive)
        depth = trace.depth.get(bytes(node_to_ask.id), 1)
        trace.finds += 1
        ok, payload = await call(self, node_to_ask, node_to_find, revive=revive)
        if not ok:
            trace.failed += 1
            return ok, payload
        trace.hops = max(trace.hops, depth)
        if isinstance(payload, dict) and payload.get("value") is not None:
            if trace.value_hops is None or depth < trace.value_hops:
                trace.value_hops = depth
        else:
            for node in self.parse_nodes(payload):
                seen = trace.depth.get(bytes(node.id))
                if seen is None or seen > depth + 1:
                    trace.depth[bytes(node.id)] = depth + 1
        return ok, payload

    return traced


def _traced_store(call: Callable[..., Awaitable[tuple[bool, Any]]]) -> Callable[..., Any]:
    async def traced(self: Any, node: Any, key: bytes, value: bytes) -> tuple[bool, Any]:
        trace = TRACE.get()
        result = await call(self, node, key, value)
        if trace is not None:
            trace.stores += 1
            trace.failed += not result[0]
        return result

    return traced


@contextlib.contextmanager
def instrumented(real_crypto: bool) -> Iterator[None]:
    """Within: the protocol's calls record into TRACE (the lookup's tasks inherit the
    context of the operation that set it) and, unless ``real_crypto``, signatures are
    64 zero bytes that verify. Everything is put back on exit."""
    saved: list[tuple[type, str, Callable[..., Any]]] = [
        (NodeProtocol, "call_find_node", _traced_finder(NodeProtocol.call_find_node)),
        (NodeProtocol, "call_find_value", _traced_finder(NodeProtocol.call_find_value)),
        (NodeProtocol, "call_store", _traced_store(NodeProtocol.call_store)),
    ]
    if not real_crypto:
        saved += [
            (SiteKey, "sign", lambda self, data: bytes(64)),
            (
                TrustStore,
                "verify_signature",
                lambda self, kid, data, signature: self.public_bytes(kid) is not None,
            ),
        ]
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in saved]
    for owner, name, replacement in saved:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


# -- the experiment -----------------------------------------------------------------------


@dataclasses.dataclass
class Op:
    ok: bool
    latency: float  # simulated seconds
    trace: Trace
    started: float
    error: str = ""  # why not ok: "not found", "timeout" or the DhtError raised


def summarize(ops: list[Op]) -> Json:
    if not ops:
        return {"ops": 0}
    lat = sorted(o.latency for o in ops)
    hops = [o.trace.hops for o in ops if o.ok]
    value_hops = [o.trace.value_hops for o in ops if o.trace.value_hops is not None]
    rpcs = [o.trace.rpcs for o in ops]
    errors: dict[str, int] = {}
    for o in ops:
        if not o.ok:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "ops": len(ops),
        "ok": sum(o.ok for o in ops),
        "success": sum(o.ok for o in ops) / len(ops),
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3,
        "rpcs_mean": statistics.fmean(rpcs),
        "rpcs_max": max(rpcs),
        "finds_mean": statistics.fmean(o.trace.finds for o in ops),
        "stores_mean": statistics.fmean(o.trace.stores for o in ops),
        "failed_rpcs_mean": statistics.fmean(o.trace.failed for o in ops),
        "hops_mean": statistics.fmean(hops) if hops else None,
        "hops_max": max(hops) if hops else None,
        "value_hops_mean": statistics.fmean(value_hops) if value_hops else None,
        "errors": errors,
    }


class Simulation:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.network = SimNetwork(self.rng, loss=options.loss, span=options.span)
        self.loop = VirtualLoop(self.network)
        self.nodes: list[DhtNode] = []
        self.keys: list[SiteKey] = []
        self.trust = TrustStore({})
        self.dead: set[int] = set()
        self.stored: list[tuple[str, int]] = []  # (AOR, version) of puts that succeeded
        self.result: Json = {"nodes": options.nodes}

    def run(self) -> Json:
        try:
            return self.loop.run_until_complete(self._run())
        finally:
            self.loop.run_until_complete(self._close())
            self.loop.close()

    def host(self, index: int) -> str:
        return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"

    async def _run(self) -> Json:
        options = self.options
        await self.phase("build", self.build)
        await self.phase("put", self.puts)
        await self.phase("get", self.gets)
        if options.kill > 0:
            await self.phase("churn", self.churn)
        return self.result

    async def phase(self, name: str, job: Callable[[], Awaitable[Json]]) -> None:
        wall, sim, sent = time.perf_counter(), self.loop.time(), self.network.stats.datagrams
        log.info("%s ...", name)
        out = await job()
        out["wall_s"] = round(time.perf_counter() - wall, 2)
        out["sim_s"] = round(self.loop.time() - sim, 2)
        out["datagrams"] = self.network.stats.datagrams - sent
        self.result[name] = out
        log.info("%s: %s", name, out)

    def make_node(self, index: int) -> DhtNode:
        key = self.keys[index % len(self.keys)]
        options: dict[str, Any] = {"clock": self.loop.wall, "salt": self.rng.randbytes(8)}
        if not self.options.real_crypto and "sessions" in inspect.signature(DhtNode).parameters:
            options["sessions"] = False
        return DhtNode(MemoryRecordStore(self.trust), self.trust, key=key, **options)

    async def build(self) -> Json:
        options = self.options
        self.keys = [SiteKey.generate() for _ in range(options.sites)]
        self.trust = TrustStore({k.key_id: k.public_bytes for k in self.keys})
        for i in range(options.nodes):
            node = self.make_node(i)
            await node.listen(self.host(i), PORT)
            self.nodes.append(node)
        joined = [0]
        # The first nodes one by one (an overlay must exist), then waves as large as the
        # overlay so far (at most --join-wave), each node via a random node that joined
        # before; then everyone once more via a random node (the routing tables of early
        # joiners fill as later ones arrive). Simulated time is what costs here: every
        # node's timers tick while it passes.
        first = min(len(self.nodes), 16)
        for i in range(1, first):
            await self.nodes[i].bootstrap([self.nodes[self.rng.choice(joined)].address])
            joined.append(i)
        wave = options.join_wave
        start = first
        while start < len(self.nodes):
            batch = list(range(start, min(start + min(wave, len(joined)), len(self.nodes))))
            seeds = {i: self.nodes[self.rng.choice(joined)].address for i in batch}
            await asyncio.gather(*(self.nodes[i].bootstrap([seeds[i]]) for i in batch))
            joined.extend(batch)
            start += len(batch)
            log.info("joined %d", len(joined))
        for start in range(0, len(self.nodes), wave * 2):
            batch = list(range(start, min(start + wave * 2, len(self.nodes))))
            await asyncio.gather(
                *(self.nodes[i].bootstrap([self.nodes[self.other(i)].address]) for i in batch)
            )
        # A node whose joins all failed tries again, as a site's keep_joined does every
        # 2 s (proxy/app.py); it would otherwise answer nothing but "unavailable".
        retried = 0
        for _ in range(5):
            lonely = [i for i, n in enumerate(self.nodes) if not n.peers()]
            if not lonely:
                break
            retried += len(lonely)
            await asyncio.sleep(2.0)
            await asyncio.gather(
                *(self.nodes[i].bootstrap([self.nodes[self.other(i)].address]) for i in lonely)
            )
        await asyncio.sleep(options.settle)
        peers = [len(n.peers()) for n in self.nodes]
        return {
            "peers_mean": statistics.fmean(peers),
            "peers_min": min(peers),
            "joins_retried": retried,
        }

    def other(self, index: int) -> int:
        while True:
            choice = self.rng.randrange(len(self.nodes))
            if choice != index and choice not in self.dead:
                return choice

    def alive(self) -> list[int]:
        return [i for i in range(len(self.nodes)) if i not in self.dead]

    def binding(self, index: int, aor: str) -> DhtBinding:
        key = self.keys[index % len(self.keys)]
        unsigned = new_binding(
            aor=aor, contact=f"sip:{aor[4:].split('@')[0]}@192.0.2.7:5060", home=f"sip:{DOMAIN}",
            site=f"site{index % len(self.keys)}", version=len(self.stored) + 1,
            now=self.loop.wall(), expires=3600,
        )  # fmt: skip
        return sign_binding(unsigned, key)

    async def traced(self, op: Callable[[], Awaitable[bool]]) -> Op:
        """Run ``op`` with a fresh Trace; it returns whether it did what it should, or
        raises the DhtError or RecordError that says why not."""
        trace = Trace()
        token = TRACE.set(trace)
        started = self.loop.time()
        error = ""
        try:
            ok = await asyncio.wait_for(op(), self.options.op_timeout)
            error = "" if ok else "not found"
        except TimeoutError:
            ok, error = False, "timeout"
        except (DhtError, RecordError) as exc:
            ok, error = False, type(exc).__name__
        finally:
            TRACE.reset(token)
        return Op(ok, self.loop.time() - started, trace, started, error)

    async def put(self, index: int, aor: str) -> Op:
        binding = self.binding(index, aor)

        async def op() -> bool:
            return int(await self.nodes[index].put(aor, [binding])) > 0

        result = await self.traced(op)
        if result.ok:
            self.stored.append((aor, binding.version))
        return result

    async def get(self, index: int, aor: str, version: int) -> Op:
        async def op() -> bool:
            found = await self.nodes[index].get(aor)
            return any(b.version == version for b in found)

        return await self.traced(op)

    async def limited(self, jobs: Iterator[Callable[[], Awaitable[Op]]], inflight: int) -> list[Op]:
        limit = asyncio.Semaphore(inflight)

        async def one(job: Callable[[], Awaitable[Op]]) -> Op:
            async with limit:
                return await job()

        return list(await asyncio.gather(*(one(job) for job in jobs)))

    async def puts(self) -> Json:
        def jobs() -> Iterator[Callable[[], Awaitable[Op]]]:
            for i in range(self.options.puts):
                index = self.rng.choice(self.alive())
                yield functools.partial(self.put, index, f"sip:user{i}@{DOMAIN}")

        return summarize(await self.limited(jobs(), self.options.inflight))

    async def gets(self) -> Json:
        def jobs() -> Iterator[Callable[[], Awaitable[Op]]]:
            for n in range(self.options.gets):
                aor, version = self.stored[n % len(self.stored)]
                index = self.rng.choice(self.alive())
                yield functools.partial(self.get, index, aor, version)

        if not self.stored:
            return {"ops": 0}
        return summarize(await self.limited(jobs(), self.options.inflight))

    async def churn(self) -> Json:
        options = self.options
        victims = self.rng.sample(range(len(self.nodes)), round(options.kill * len(self.nodes)))
        for i in victims:
            self.dead.add(i)
            await self.nodes[i].close()
        start = self.loop.time()
        tasks: list[asyncio.Task[Op]] = []
        n = 0
        while self.loop.time() - start < options.churn_seconds and self.stored:
            aor, version = self.stored[self.rng.randrange(len(self.stored))]
            index = self.rng.choice(self.alive())
            tasks.append(asyncio.ensure_future(self.get(index, aor, version)))
            n += 1
            await asyncio.sleep(max(0.0, start + n / options.churn_rate - self.loop.time()))
        ops = list(await asyncio.gather(*tasks))
        buckets: dict[int, list[Op]] = {}
        for op in ops:
            buckets.setdefault(int((op.started - start) // options.bucket), []).append(op)
        return {
            "killed": len(victims),
            "all": summarize(ops),
            "buckets": [
                {"from_s": b * options.bucket, **summarize(buckets[b])} for b in sorted(buckets)
            ],
        }

    async def _close(self) -> None:
        # All at once: one by one, every close let simulated time pass for all the
        # others' timers (10,000 nodes took longer to close than to simulate).
        await asyncio.gather(*(node.close() for node in self.nodes))


# -- output -------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(result: Json) -> Iterator[str]:
    build = result["build"]
    yield (
        f"{result['nodes']} nodes: built in {build['sim_s']:.0f} s simulated "
        f"({build['wall_s']:.0f} s wall), {build['peers_mean']:.0f} peers each on average "
        f"(min {build['peers_min']})"
    )
    yield ""
    yield (
        "| phase | ops | success | p50 ms | p99 ms | RPCs/op | of which stores "
        "| failed RPCs/op | hops | value hops | failures |"
    )
    yield "|---|---|---|---|---|---|---|---|---|---|---|"
    rows = [("put", result.get("put")), ("get", result.get("get"))]
    churn = result.get("churn")
    if churn:
        rows.append((f"get after {churn['killed']} killed, all", churn["all"]))
        rows += [(f"... from {b['from_s']:.0f} s", b) for b in churn["buckets"]]
    for name, s in rows:
        if not s or not s.get("ops"):
            continue
        yield (
            f"| {name} | {s['ops']} | {s['success'] * 100:.1f}% | {fmt(s['p50_ms'])} "
            f"| {fmt(s['p99_ms'])} | {fmt(s['rpcs_mean'])} | {fmt(s['stores_mean'])} "
            f"| {fmt(s['failed_rpcs_mean'], 2)} | {fmt(s['hops_mean'], 2)} (max {s['hops_max']}) "
            f"| {fmt(s['value_hops_mean'], 2)} "
            f"| {', '.join(f'{n} {e}' for e, n in s['errors'].items()) or '-'} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--sites", type=int, default=16, help="site keys the nodes share")
    parser.add_argument("--puts", type=int, default=500)
    parser.add_argument("--gets", type=int, default=1000)
    parser.add_argument("--inflight", type=int, default=100, help="puts or gets at once")
    parser.add_argument("--loss", type=float, default=0.01, help="datagram loss probability")
    parser.add_argument("--span", type=float, default=0.060, help="one-way s across the plane")
    parser.add_argument("--kill", type=float, default=0.2, help="fraction killed (0: none)")
    parser.add_argument("--churn-seconds", type=float, default=60.0)
    parser.add_argument("--churn-rate", type=float, default=10.0, help="gets per simulated s")
    parser.add_argument("--bucket", type=float, default=10.0)
    parser.add_argument("--join-wave", type=int, default=2000, help="nodes joining at once")
    parser.add_argument("--settle", type=float, default=5.0, help="simulated s after the joins")
    parser.add_argument("--op-timeout", type=float, default=30.0, help="simulated s")
    parser.add_argument("--real-crypto", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def simulate(options: argparse.Namespace) -> Json:
    """Run one simulation in this process."""
    with instrumented(options.real_crypto):
        return Simulation(options).run()


def main() -> None:
    options = parse_args()
    logging.basicConfig(
        level=logging.CRITICAL, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    log.setLevel(logging.INFO if options.verbose else logging.WARNING)
    started = time.perf_counter()
    result = simulate(options)
    result["options"] = vars(options)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print("\n".join(table(result)))
    if options.json:
        options.json.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

"""One OS process of bench/dht_scale.py: hosts a share of the overlay's nodes.

Started by the coordinator (``dht_scale.py``) with ``--engine p2psip`` (``DhtNode``s on one
asyncio event loop) or ``--engine opendht`` (OpenDHT 4.4.2 ``DhtRunner``s, each with its
own C++ threads). It reads one JSON command per line on stdin and answers one JSON line
per command on stdout, ``{"id": ..., "result": ...}`` or ``{"id": ..., "error": "..."}``.
Commands run concurrently, so the coordinator can keep several operations in flight in
one worker. Only loopback addresses are used.

What it counts, for the coordinator to difference between phases:

* ``cpu``: user + system CPU seconds of this process, all threads (``getrusage``).
* ``rpcs``: for p2psip, half the datagrams its nodes sent (a request and its answer; a
  timed-out request counts half), counted at the transport, below any wire format. For
  OpenDHT, the ping/find/get/listen/put requests its nodes sent (``getNodeMessageStats``,
  which resets on every read: summed here).

Not a test and not for production: a load generator's far end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import dataclasses
import hashlib
import json
import logging
import os
import random
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from socket import AF_INET
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dht_adaptor.errors import DhtError
from dht_adaptor.keys import SiteKey, TrustStore, sign_binding
from dht_adaptor.node import DhtNode
from dht_adaptor.record import DhtBinding, RecordError, dht_key, encode_record, new_binding
from dht_adaptor.record_store import MemoryRecordStore

log = logging.getLogger("dht_scale_worker")

HOST = "127.0.0.1"
DOMAIN = "bench.example.com"
HOME = "sip:proxy.bench.example.com:5060"
EXPIRES = 3600  # seconds, the registrar's default

Json = dict[str, Any]


def user_binding(aor: str, key: SiteKey, site: str, now: float) -> DhtBinding:
    """A signed binding of ``aor`` as a site's adaptor makes one (one contact, 3600 s)."""
    user = aor.removeprefix("sip:").split("@", 1)[0]
    unsigned = new_binding(
        aor=aor,
        contact=f"sip:{user}@192.0.2.7:5060;transport=udp",
        home=HOME, site=site, version=time.time_ns(), now=now, expires=EXPIRES,
    )  # fmt: skip
    return sign_binding(unsigned, key)


def pool_aor(index: int) -> str:
    """The AOR of preloaded record ``index`` (the coordinator places them by its key)."""
    return f"sip:pre{index}@{DOMAIN}"


def pool_binding(index: int, kid: str, epoch: float, signature: bytes = b"") -> DhtBinding:
    """Preloaded record ``index`` as site ``kid`` signs it: the same fields in every
    worker, so that a signature made in one holds in all (``sign_binding``'s layout:
    the binding with its key id and an empty signature is what is signed)."""
    return DhtBinding(
        aor=pool_aor(index), contact=f"sip:pre{index}@192.0.2.7:5060;transport=udp",
        home=HOME, expires_at=epoch + EXPIRES, site=f"site-{kid[:6]}", version=index + 1,
        key_id=kid, signature=signature,
    )  # fmt: skip


class DatagramCounter:
    """Counts the datagrams this process's nodes send, below any wire format: every
    datagram endpoint made on the loop gets a transport whose ``sendto`` counts."""

    def __init__(self) -> None:
        self.sent = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        make = loop.create_datagram_endpoint
        counter = self

        async def counting_endpoint(factory: Callable[[], Any], *args: Any, **kw: Any) -> Any:
            def counted() -> Any:
                protocol = factory()
                made = protocol.connection_made
                protocol.connection_made = lambda t: made(_CountingTransport(t, counter))
                return protocol

            return await make(counted, *args, **kw)

        loop.create_datagram_endpoint = counting_endpoint  # type: ignore[method-assign,assignment]


class _CountingTransport:
    def __init__(self, transport: Any, counter: DatagramCounter) -> None:
        self._transport = transport
        self._counter = counter

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._counter.sent += 1
        self._transport.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class Engine:
    """The nodes of one worker; subclasses say how to run them."""

    def __init__(self) -> None:
        self.prepared: dict[str, Any] = {}  # aor -> what put sends
        self.alive: set[int] = set()

    async def init(self, args: Json) -> list[Json]:
        raise NotImplementedError

    async def trust(self, args: Json) -> list[Json]:
        return []

    async def listen(self, args: Json) -> list[Json]:
        return []

    async def bootstrap(self, args: Json) -> list[int]:
        raise NotImplementedError

    async def preload(self, args: Json) -> int:
        return 0

    def sign_pool(self, args: Json) -> Json:
        raise NotImplementedError

    def prepare(self, args: Json) -> list[str]:
        """Sign the bindings of ``jobs`` (AOR, origin node) for later puts; returns what
        a get must find for each (a fingerprint the coordinator passes to ``get``)."""
        raise NotImplementedError

    async def put(self, node: int, aor: str) -> bool:
        raise NotImplementedError

    async def get(self, node: int, aor: str, expect: str) -> bool:
        raise NotImplementedError

    def counters(self, peers: bool) -> Json:
        """Cumulative counters (``peers``: also the routing tables' sizes, summed)."""
        raise NotImplementedError

    async def kill(self, nodes: list[int]) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        await self.kill(sorted(self.alive))


class P2psipEngine(Engine):
    """``DhtNode``s, one site key and one TrustStore each (a node per site)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[SiteKey] = []
        self.nodes: list[DhtNode] = []
        self.datagrams = DatagramCounter()
        self.datagrams.install(asyncio.get_running_loop())
        self.republish = 600.0

    async def init(self, args: Json) -> list[Json]:
        self.republish = float(args.get("republish", 600.0))
        self.keys = [SiteKey.generate() for _ in range(int(args["count"]))]
        return [{"kid": k.key_id, "pub": k.public_bytes.hex()} for k in self.keys]

    async def trust(self, args: Json) -> list[Json]:
        """Make the nodes (not listening yet: preloaded records are indexed at listen)."""
        table = {kid: bytes.fromhex(pub) for kid, pub in args["keys"].items()}
        for key in self.keys:
            trust = TrustStore(table)  # one per node: each site verifies for itself
            node = DhtNode(
                MemoryRecordStore(trust), trust, key=key, republish_interval=self.republish
            )
            self.nodes.append(node)
        return [{"id": node.node_id_hex} for node in self.nodes]

    async def listen(self, args: Json) -> list[Json]:
        out = []
        for i, node in enumerate(self.nodes):
            port = await node.listen(HOST, 0)
            self.alive.add(i)
            out.append({"addr": [HOST, port], "id": node.node_id_hex})
        return out

    async def bootstrap(self, args: Json) -> list[int]:
        limit = asyncio.Semaphore(int(args.get("concurrency", 8)))

        async def join(i: int, seeds: list[list[Any]]) -> int:
            async with limit:
                try:
                    return await self.nodes[i].bootstrap([(h, int(p)) for h, p in seeds])
                except DhtError:
                    return 0

        plan = args["plan"]  # [[local index, [[host, port], ...]], ...]
        return list(await asyncio.gather(*(join(int(i), seeds) for i, seeds in plan)))

    def sign_pool(self, args: Json) -> Json:
        """Sign preloaded records ``range(first, count, step)`` with our first node's key:
        each record is signed once, by one worker, and the signatures are shared."""
        signer = self.keys[0]
        epoch = float(args["epoch"])
        signatures = [
            signer.sign(pool_binding(i, signer.key_id, epoch).signing_bytes())
            for i in range(int(args["first"]), int(args["count"]), int(args["step"]))
        ]
        return {"kid": signer.key_id, "sigs": base64.b64encode(b"".join(signatures)).decode()}

    async def preload(self, args: Json) -> int:
        """Write the records the coordinator placed on our nodes straight into their stores
        (no RPC, no verification), as if the overlay had replicated them earlier, and
        index them (a node that is not listening yet indexes its store at ``listen``).
        ``sigs``: the signatures of every record we hold, in index order; record i was
        signed by ``kids[i % len(kids)]``."""
        holdings: dict[str, list[int]] = args["holdings"]  # local index -> pool indices
        kids: list[str] = args["kids"]
        epoch = float(args["epoch"])
        needed = sorted({i for indices in holdings.values() for i in indices})
        raw = base64.b64decode(args["sigs"])
        pool: dict[int, tuple[bytes, tuple[DhtBinding, ...]]] = {}
        for n, index in enumerate(needed):
            signature = raw[n * 64 : (n + 1) * 64]
            binding = pool_binding(index, kids[index % len(kids)], epoch, signature)
            pool[index] = (dht_key(binding.aor), (binding,))
        written = 0
        for local, indices in holdings.items():
            node = self.nodes[int(local)]
            listening = int(local) in self.alive
            for index in indices:
                key, bindings = pool[index]
                await write_held(node.store, key, bindings, epoch)
                if listening:
                    node._protocol.index.add(key)
                written += 1
            await asyncio.sleep(0)
        return written

    def prepare(self, args: Json) -> list[str]:
        now = time.time()
        out = []
        for job in args["jobs"]:
            key = self.keys[int(job["node"])]
            binding = user_binding(job["aor"], key, f"site-{key.key_id[:6]}", now)
            self.prepared[job["aor"]] = binding
            out.append(str(binding.version))
        return out

    async def put(self, node: int, aor: str) -> bool:
        binding: DhtBinding = self.prepared.pop(aor)
        try:
            return await self.nodes[node].put(aor, [binding]) > 0
        except (DhtError, RecordError):
            return False

    async def get(self, node: int, aor: str, expect: str) -> bool:
        try:
            found = await self.nodes[node].get(aor)
        except DhtError:
            return False
        return any(b.aor == aor and str(b.version) == expect for b in found)

    def counters(self, peers: bool) -> Json:
        totals: dict[str, float] = {}
        names = (
            "rpc_timeouts",
            "repairs",
            "get_retries",
            "replication_examined",
            "offered_keys",
            "offers_taken",
            "rpc_timeouts_lagged",
            "shed",
        )
        for i in self.alive:
            stats = self.nodes[i].stats()
            for name in (*names, "peers") if peers else names:
                totals[name] = totals.get(name, 0) + float(stats.get(name, 0))
        # A request and its answer are two datagrams; a timed-out RPC is one.
        totals["datagrams"] = self.datagrams.sent
        totals["rpcs"] = self.datagrams.sent / 2
        return totals

    async def kill(self, nodes: list[int]) -> int:
        for i in nodes:
            if i in self.alive:
                self.alive.discard(i)
                await self.nodes[i].close()
        return len(nodes)


async def write_held(store: Any, key: bytes, bindings: tuple[DhtBinding, ...], now: float) -> None:
    """Hold ``bindings`` under ``key`` in a MemoryRecordStore without decoding or verifying
    them (``_set``, its one writer, which the bench borrows: ``merge_in`` would decode and
    keep a copy per node, 0.8 KB a record); stores without it get ``merge_in``."""
    setter = getattr(store, "_set", None)
    if setter is not None:
        setter(key, bindings)
    else:
        await store.merge_in(key, encode_record(bindings), now)


class OpenDhtEngine(Engine):
    """OpenDHT ``DhtRunner``s on loopback, the values the same encoded records."""

    def __init__(self) -> None:
        super().__init__()
        import opendht

        self.dht = opendht
        self.runners: list[Any] = []
        self.sent = [0, 0, 0, 0, 0]  # ping, find, get, listen, put (summed, see module doc)
        self.key = SiteKey.generate()
        self.loop = asyncio.get_running_loop()

    async def init(self, args: Json) -> list[Json]:
        out = []
        for _ in range(int(args["count"])):
            config = self.dht.DhtConfig()
            # All nodes share 127.0.0.1: lift the per-address request limit that a real
            # deployment (one address per node) would never meet.
            config.setRateLimit(-1, -1)
            runner = self.dht.DhtRunner()
            runner.run(port=0, ipv4=HOST, config=config)
            self.alive.add(len(self.runners))
            self.runners.append(runner)
            port = runner.getBound().getPort()
            out.append({"addr": [HOST, port]})
        return out

    async def bootstrap(self, args: Json) -> list[int]:
        for i, seeds in args["plan"]:
            for host, port in seeds:
                self.runners[int(i)].bootstrap(host, str(port))
            await asyncio.sleep(0)
        return [0 for _ in args["plan"]]

    def prepare(self, args: Json) -> list[str]:
        now = time.time()
        out = []
        for job in args["jobs"]:
            value = encode_record([user_binding(job["aor"], self.key, "opendht", now)])
            self.prepared[job["aor"]] = value
            out.append(hashlib.sha1(value).hexdigest())
        return out

    def _done(self) -> tuple[asyncio.Future[bool], Callable[[bool, Any], None]]:
        future: asyncio.Future[bool] = self.loop.create_future()

        def done(ok: bool, _nodes: Any) -> None:  # on an OpenDHT thread
            self.loop.call_soon_threadsafe(_settle, future, bool(ok))

        return future, done

    async def put(self, node: int, aor: str) -> bool:
        value: bytes = self.prepared.pop(aor)
        future, done = self._done()
        self.runners[node].put(self.dht.InfoHash.get(aor), self.dht.Value(value), done)
        return await future

    async def get(self, node: int, aor: str, expect: str) -> bool:
        found = False

        def on_value(value: Any) -> bool:  # on an OpenDHT thread
            nonlocal found
            found = found or hashlib.sha1(bytes(value.data)).hexdigest() == expect
            return True

        future, done = self._done()
        self.runners[node].get(self.dht.InfoHash.get(aor), on_value, done)
        await future
        return found

    def counters(self, peers: bool) -> Json:
        for i in self.alive:
            for j, n in enumerate(self.runners[i].getNodeMessageStats()):
                self.sent[j] += n
        out: Json = {"rpcs": sum(self.sent), "rpc_kinds": list(self.sent)}
        if peers:  # the "good" IPv4 contacts of each routing table, from its text dump
            tables = (self.runners[i].getRoutingTablesLog(AF_INET) for i in self.alive)
            out["peers"] = sum(t.count("[good]") for t in tables)
        return out

    async def kill(self, nodes: list[int]) -> int:
        """Shut the runners down. Never ``join()``: the binding holds the GIL while it
        waits, and a runner thread calling back into Python then never ends."""
        doomed = [self.runners[i] for i in nodes if i in self.alive]
        self.alive.difference_update(nodes)
        stopped = []
        for runner in doomed:
            future: asyncio.Future[bool] = self.loop.create_future()
            runner.shutdown(lambda f=future: self.loop.call_soon_threadsafe(_settle, f, True))
            stopped.append(future)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*stopped), 10)
        return len(doomed)


def _settle(future: asyncio.Future[bool], ok: bool) -> None:
    if not future.done():
        future.set_result(ok)


@dataclasses.dataclass
class Worker:
    engine: Engine
    op_timeout: float = 30.0
    profiler: cProfile.Profile | None = None

    async def timed(self, op: Callable[[], Awaitable[bool]]) -> Json:
        started = time.perf_counter()
        try:
            ok = await asyncio.wait_for(op(), self.op_timeout)
        except TimeoutError:
            ok = False
        return {"ok": ok, "lat": time.perf_counter() - started}

    def op(self, name: str, job: Json) -> Awaitable[bool]:
        if name == "put":
            return self.engine.put(int(job["node"]), job["aor"])
        return self.engine.get(int(job["node"]), job["aor"], str(job["expect"]))

    async def batch(self, args: Json) -> list[Json]:
        """Run ``jobs`` (put or get) with ``inflight`` at a time; results in job order."""
        limit = asyncio.Semaphore(int(args["inflight"]))
        origin = time.perf_counter()

        async def one(job: Json) -> Json:
            async with limit:
                start = time.perf_counter() - origin
                result = await self.timed(lambda: self.op(args["op"], job))
                return {**result, "t": start}

        return list(await asyncio.gather(*(one(job) for job in args["jobs"])))

    async def handle(self, command: str, args: Json) -> Any:
        engine = self.engine
        if command == "init":
            self.op_timeout = float(args.get("op_timeout", self.op_timeout))
            return await engine.init(args)
        if command == "trust":
            return await engine.trust(args)
        if command == "listen":
            return await engine.listen(args)
        if command == "bootstrap":
            return await engine.bootstrap(args)
        if command == "preload":
            return await engine.preload(args)
        if command == "sign_pool":
            return engine.sign_pool(args)
        if command == "prepare":
            return engine.prepare(args)
        if command in ("put", "get"):
            return await self.timed(lambda: self.op(command, args))
        if command == "batch":
            return await self.batch(args)
        if command == "stats":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            counters = engine.counters(bool(args.get("peers")))
            return {"cpu": usage.ru_utime + usage.ru_stime, **counters}
        if command == "kill":
            return await engine.kill([int(i) for i in args["nodes"]])
        if command == "profile":  # this process's Python code only (not OpenDHT's C++)
            if args.get("path") is None:
                self.profiler = cProfile.Profile()
                self.profiler.enable()
            elif self.profiler is not None:
                self.profiler.disable()
                self.profiler.dump_stats(args["path"])
                self.profiler = None
            return True
        raise ValueError(f"unknown command {command!r}")


async def serve(engine_name: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 28)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    engine: Engine = P2psipEngine() if engine_name == "p2psip" else OpenDhtEngine()
    worker = Worker(engine)
    tasks: set[asyncio.Task[None]] = set()

    def answer(message: Json) -> None:
        sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    async def run(message: Json) -> None:
        try:
            result = await worker.handle(message["cmd"], message.get("args", {}))
        except Exception as exc:  # reported to the coordinator, which stops the run
            log.exception("command %s failed", message.get("cmd"))
            answer({"id": message["id"], "error": f"{type(exc).__name__}: {exc}"})
            return
        answer({"id": message["id"], "result": result})

    random.seed()
    while line := await reader.readline():
        message = json.loads(line)
        if message["cmd"] == "quit":
            break
        task = loop.create_task(run(message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in tasks:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(engine.close(), 30)
    sys.stdout.flush()
    # OpenDHT runners join their threads when collected, holding the GIL (see kill).
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("p2psip", "opendht"), required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    options = parser.parse_args()
    # kademlia/rpcudp and the node log every timeout: keep stderr for real failures.
    logging.basicConfig(
        level=logging.INFO if options.verbose else logging.CRITICAL,
        format=f"worker {options.engine} %(levelname)s %(name)s: %(message)s",
    )
    log.setLevel(logging.WARNING)
    asyncio.run(serve(options.engine))


if __name__ == "__main__":
    main()

"""The overlay at scale: CPU, RPCs, latency and throughput per operation, p2psip against
OpenDHT, with N nodes over several OS processes on loopback.

For each engine, node count N and preload R (records per node), one fresh overlay:

  build      ``--procs`` worker processes (``dht_scale_worker.py``), each hosting N/procs
             nodes on its own event loop (OpenDHT: its own threads); one site key per
             node; every node joins via the first node, then again via two random nodes.
  preload    p2psip: once the nodes have joined (``--preload-at joined``, the default:
             an overlay that has run a while) or before they listen (``start``: every
             site restarting with the records it kept), each node's store gets R signed
             records written straight in (no RPC): N*R/k records, each held by its k
             closest nodes (k: DhtNode's default), as the overlay would have replicated
             them.
             OpenDHT: N*R/8 real puts after the join (it stores 8 copies), not
             measured, and only within ``--opendht-preload-budget`` puts.
  idle       CPU of the overlay doing nothing for ``--idle`` seconds.
  put, get   ``--ops`` puts one at a time from random nodes, then a get of each from
             another random node: latency p50/p99, success, and CPU and RPCs per
             operation summed over all worker processes.
  20 in flt  ``--tput-ops`` puts, 20 in flight: puts/s, CPU per put.
  churn      kill 20% of the nodes (sockets closed: a crash), then gets of the records put
             above from random survivors at ``--churn-rate`` per second for
             ``--churn-seconds``: success and p50 per ``--bucket`` seconds.

Records are signed bindings as the adaptor makes them (one contact, 3600 s); OpenDHT
stores the same encoded bytes as plain values (it verifies nothing). CPU is user +
system time of the worker processes, all threads (getrusage), differenced between
phases and divided by the operations: background work during a phase counts. RPCs:
p2psip, datagrams sent / 2 (counted at the transport); OpenDHT, requests sent
(getNodeMessageStats). p2psip nodes republish every ``--republish`` s (default a day:
the bench measures operations; docs/scale-model.md adds republishing).

Run:  .venv/bin/python bench/dht_scale.py                    # 30..1000 nodes x 0/1k/10k
      .venv/bin/python bench/dht_scale.py --quick            # a smoke run, well under 1 min
      .venv/bin/python bench/dht_scale.py --nodes 1000 --preload 0,1000 --json out.json
Not a test: numbers depend on the machine and its load; bench/README.md records some.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import inspect
import json
import math
import os
import platform
import pstats
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dht_adaptor.node import DhtNode
from dht_adaptor.record import dht_key

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dht_scale_worker.py"
# DhtNode's default k: the copies of a record in the overlay
KSIZE = int(inspect.signature(DhtNode).parameters["ksize"].default)
OPENDHT_COPIES = 8  # OpenDHT stores each value at the 8 closest nodes
INFLIGHT = 20
KILL_FRACTION = 0.2
DOMAIN = "bench.example.com"
Json = dict[str, Any]


# -- worker processes --------------------------------------------------------------------


class WorkerError(Exception):
    """A worker answered a command with an error, or died."""


class Worker:
    """One worker process, driven by JSON lines; commands may overlap."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc
        self.count = 0
        self._ids = iter(range(1 << 62))
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls, index: int, engine: str, verbose: bool) -> Worker:
        cmd = [sys.executable, str(WORKER), "--engine", engine] + (["-v"] if verbose else [])
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 28
        )
        return cls(index, proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = json.loads(line)
            future = self._pending.pop(message["id"], None)
            if future is None or future.done():
                continue
            if "error" in message:
                future.set_exception(WorkerError(f"worker {self.index}: {message['error']}"))
            else:
                future.set_result(message["result"])
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerError(f"worker {self.index} exited"))

    async def call(self, cmd: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        line = json.dumps({"id": ident, "cmd": cmd, "args": args}, separators=(",", ":"))
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        return await future

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"id":-1,"cmd":"quit"}\n')
            await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


@dataclass(frozen=True, slots=True)
class NodeRef:
    worker: int
    local: int


EXTRA = (
    "repairs",
    "replication_examined",
    "offered_keys",
    "offers_taken",
    "shed",
    "get_retries",
)  # DhtNode.stats()


@dataclass
class Counters:
    cpu: float = 0.0
    rpcs: float = 0.0
    timeouts: float = 0.0
    peers: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.cpu - other.cpu,
            self.rpcs - other.rpcs,
            self.timeouts - other.timeouts,
            self.peers - other.peers,
            {k: v - other.extra.get(k, 0.0) for k, v in self.extra.items()},
        )


# -- progress ----------------------------------------------------------------------------


class Progress:
    """One line on stderr, rewritten in place on a terminal, every few seconds otherwise."""

    def __init__(self) -> None:
        self.label = ""
        self.phase = ""
        self.done = 0
        self.total = 0
        self.ok = 0
        self.started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._last = 0.0

    def set(self, phase: str, total: int = 0) -> None:
        self.phase, self.total, self.done, self.ok = phase, total, 0, 0
        self.show(force=True)

    def tick(self, ok: bool) -> None:
        self.done += 1
        self.ok += ok
        self.show()

    def show(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.5 if self._tty else 10.0):
            return
        self._last = now
        count = f" {self.done}/{self.total} ok {self.ok}" if self.total else ""
        line = f"[{self.label}] {self.phase}{count}  ({now - self.started:.0f} s)"
        if self._tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self._tty:
            sys.stderr.write("\n")


PROGRESS = Progress()


# -- measurements ------------------------------------------------------------------------


@dataclass
class OpStats:
    """One kind of operation in one phase."""

    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    issued: int = 0
    wall: float = 0.0
    cost: Counters = field(default_factory=Counters)
    unfinished: int = 0  # not issued before the phase's deadline
    succeeded: list[str] = field(default_factory=list)  # AORs of the operations that did

    def add(self, result: Json, aor: str = "") -> None:
        self.issued += 1
        self.ok += bool(result["ok"])
        if result["ok"]:
            self.succeeded.append(aor)
        self.latencies.append(float(result["lat"]))
        PROGRESS.tick(bool(result["ok"]))

    def summary(self) -> Json:
        lat = sorted(self.latencies)
        n = max(self.issued, 1)
        return {
            "issued": self.issued,
            "ok": self.ok,
            "unfinished": self.unfinished,
            "p50_ms": percentile(lat, 0.5) * 1e3 if lat else None,
            "p99_ms": percentile(lat, 0.99) * 1e3 if lat else None,
            "cpu_ms_per_op": self.cost.cpu / n * 1e3 if self.issued else None,
            "rpcs_per_op": self.cost.rpcs / n if self.issued else None,
            "timeouts_per_op": self.cost.timeouts / n if self.issued else None,
            **{f"{k}_per_op": v / n for k, v in self.cost.extra.items() if self.issued},
            "wall_s": self.wall,
            "ops_per_s": self.issued / self.wall if self.wall else None,
        }


def percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


class Overlay:
    """The worker processes of one engine and the nodes they host."""

    def __init__(self, engine: str, options: argparse.Namespace) -> None:
        self.engine = engine
        self.options = options
        self.workers: list[Worker] = []
        self.nodes: list[NodeRef] = []
        self.addresses: list[tuple[str, int]] = []
        self.ids: list[int] = []  # p2psip node ids as integers (placement of the preload)
        self.dead: set[int] = set()
        self.rng = random.Random(options.seed)

    async def start(self, count: int) -> None:
        procs = min(self.options.procs, count)
        self.workers = list(
            await asyncio.gather(
                *(Worker.start(w, self.engine, self.options.verbose) for w in range(procs))
            )
        )
        shares = [count // procs + (1 if w < count % procs else 0) for w in range(procs)]
        init = {"republish": self.options.republish, "op_timeout": self.options.op_timeout}
        infos = await asyncio.gather(
            *(w.call("init", count=n, **init) for w, n in zip(self.workers, shares, strict=True))
        )
        if self.engine == "p2psip":  # every node trusts every site (a node per site)
            keys = {k["kid"]: k["pub"] for share in infos for k in share}
            infos = await asyncio.gather(*(w.call("trust", keys=keys) for w in self.workers))
        for worker, share in zip(self.workers, infos, strict=True):
            worker.count = len(share)
            for local, info in enumerate(share):
                self.nodes.append(NodeRef(worker.index, local))
                if "id" in info:
                    self.ids.append(int(info["id"], 16))
                if "addr" in info:
                    self.addresses.append((info["addr"][0], int(info["addr"][1])))

    async def listen(self) -> None:
        """p2psip nodes listen once their stores are loaded (OpenDHT's run at init)."""
        if self.addresses:
            return
        infos = await asyncio.gather(*(w.call("listen") for w in self.workers))
        for share in infos:
            self.addresses.extend((info["addr"][0], int(info["addr"][1])) for info in share)

    async def join(self) -> None:
        """Every node joins via node 0, then again via two random nodes."""
        seed = [list(self.addresses[0])]
        await self._bootstrap({i: seed for i in range(1, len(self.nodes))})
        others = {
            i: [list(self.addresses[j]) for j in self._pick(i, 2)] for i in range(len(self.nodes))
        }
        await self._bootstrap(others)
        if self.engine == "opendht":  # its joins run in its own threads: let them settle
            await asyncio.sleep(self.options.settle + len(self.nodes) / 200)

    def _pick(self, me: int, count: int) -> list[int]:
        choices = [j for j in self.rng.sample(range(len(self.nodes)), count + 1) if j != me]
        return choices[:count]

    async def _bootstrap(self, plan: dict[int, list[list[Any]]]) -> None:
        per_worker: dict[int, list[list[Any]]] = {}
        for index, seeds in plan.items():
            ref = self.nodes[index]
            per_worker.setdefault(ref.worker, []).append([ref.local, seeds])
        await asyncio.gather(
            *(
                self.workers[w].call(
                    "bootstrap", plan=jobs, concurrency=self.options.join_concurrency
                )
                for w, jobs in per_worker.items()
            )
        )

    async def counters(self, *, peers: bool = False) -> Counters:
        stats = await asyncio.gather(*(w.call("stats", peers=peers) for w in self.workers))
        return Counters(
            cpu=sum(s["cpu"] for s in stats),
            rpcs=sum(s.get("rpcs", 0) for s in stats),
            timeouts=sum(s.get("rpc_timeouts", 0) for s in stats),
            peers=sum(s.get("peers", 0) for s in stats),
            extra={name: sum(s.get(name, 0) for s in stats) for name in EXTRA},
        )

    def alive(self) -> list[int]:
        return [i for i in range(len(self.nodes)) if i not in self.dead]

    async def prepare(self, jobs: list[tuple[int, str]]) -> dict[str, str]:
        """Sign the bindings of (origin node, AOR) jobs in their workers, untimed; returns
        what a get must find for each AOR."""
        per_worker: dict[int, list[Json]] = {}
        for index, aor in jobs:
            ref = self.nodes[index]
            per_worker.setdefault(ref.worker, []).append({"node": ref.local, "aor": aor})
        expect: dict[str, str] = {}
        answers = await asyncio.gather(
            *(self.workers[w].call("prepare", jobs=j) for w, j in per_worker.items())
        )
        for worker_jobs, fingerprints in zip(per_worker.values(), answers, strict=True):
            for job, fingerprint in zip(worker_jobs, fingerprints, strict=True):
                expect[job["aor"]] = fingerprint
        return expect

    async def op(self, name: str, index: int, aor: str, expect: str = "") -> Json:
        ref = self.nodes[index]
        result: Json = await self.workers[ref.worker].call(
            name, node=ref.local, aor=aor, expect=expect
        )
        return result

    async def kill(self, victims: list[int]) -> None:
        per_worker: dict[int, list[int]] = {}
        for index in victims:
            self.dead.add(index)
            per_worker.setdefault(self.nodes[index].worker, []).append(self.nodes[index].local)
        await asyncio.gather(
            *(self.workers[w].call("kill", nodes=n) for w, n in per_worker.items())
        )

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))


# -- placement of the preload ------------------------------------------------------------


def closest(ordered: list[tuple[int, int]], key: int, k: int) -> list[int]:
    """The indices of the k nodes whose ids are XOR-closest to ``key``; ``ordered`` is
    (id, index) sorted by id. Nodes sharing a longer prefix with the key are always
    closer, so the k closest lie in the smallest aligned block around the key that
    holds k nodes."""
    if len(ordered) <= k:
        return [index for _, index in ordered]
    lo_bits, hi_bits = 0, 160  # find the largest prefix length whose block holds >= k
    while lo_bits < hi_bits:
        mid = (lo_bits + hi_bits + 1) // 2
        shift = 160 - mid
        start = (key >> shift) << shift
        held = bisect.bisect_left(ordered, (start + (1 << shift), -1)) - bisect.bisect_left(
            ordered, (start, -1)
        )
        if held >= k:
            lo_bits = mid
        else:
            hi_bits = mid - 1
    shift = 160 - lo_bits
    start = (key >> shift) << shift
    block = ordered[
        bisect.bisect_left(ordered, (start, -1)) : bisect.bisect_left(
            ordered, (start + (1 << shift), -1)
        )
    ]
    block.sort(key=lambda entry: entry[0] ^ key)
    return [index for _, index in block[:k]]


def placement(ids: list[int], per_node: int, k: int) -> tuple[int, dict[int, list[int]]]:
    """(records, node index -> record indices): N*R/k records ``pre<i>``, each at its k
    closest nodes, so that nodes hold R on average."""
    records = math.ceil(len(ids) * per_node / min(k, len(ids)))
    ordered = sorted((node_id, index) for index, node_id in enumerate(ids))
    held: dict[int, list[int]] = {index: [] for index in range(len(ids))}
    for record in range(records):
        key = int.from_bytes(dht_key(f"sip:pre{record}@{DOMAIN}"), "big")
        for index in closest(ordered, key, k):
            held[index].append(record)
    return records, held


# -- phases ------------------------------------------------------------------------------


class Run:
    """One engine, one size, one preload: a fresh overlay and every phase."""

    def __init__(self, engine: str, count: int, preload: int, options: argparse.Namespace):
        self.engine = engine
        self.count = count
        self.preload = preload
        self.options = options
        self.overlay = Overlay(engine, options)
        self.rng = random.Random(options.seed * 7919 + count * 31 + preload)
        self.result: Json = {"engine": engine, "nodes": count, "preload": preload}
        self.tag = f"{engine[0]}{count}r{preload}"
        self.written: list[tuple[str, str]] = []  # (AOR, fingerprint) of successful puts

    async def run(self) -> Json:
        PROGRESS.label = f"{self.engine} N={self.count} R={self.preload}"
        overlay = self.overlay
        started = time.monotonic()
        try:
            PROGRESS.set("starting workers and nodes")
            await overlay.start(self.count)
            early = self.engine == "p2psip" and self.options.preload_at == "start"
            if early:  # into the stores, before the nodes index them
                await self.load()
            await overlay.listen()
            PROGRESS.set("joining")
            t = time.monotonic()
            await overlay.join()
            self.result["build_s"] = time.monotonic() - t
            self.result["preload_at"] = self.options.preload_at
            if not early and not await self.load():
                return self.result
            await self.quiesce()
            counters = await overlay.counters(peers=True)
            self.result["peers_mean"] = counters.peers / len(overlay.alive())
            await self.idle()
            await self.operations()
            await self.churn()
        finally:
            PROGRESS.set("stopping")
            await overlay.stop()
            self.result["total_s"] = time.monotonic() - started
        return self.result

    async def load(self) -> bool:
        """The preload; False when it is out of budget (the run is skipped)."""
        overlay, preload = self.overlay, self.preload
        t = time.monotonic()
        if preload and self.engine == "p2psip":
            PROGRESS.set(f"placing {preload} records per node")
            records, held = placement(overlay.ids, preload, KSIZE)
            self.result["copies"] = KSIZE
            per_worker: dict[int, dict[str, list[int]]] = {}
            for index, indices in held.items():
                ref = overlay.nodes[index]
                per_worker.setdefault(ref.worker, {})[str(ref.local)] = indices
            PROGRESS.set(f"signing {records} records, each once")
            epoch = time.time()
            workers = overlay.workers
            step = len(workers)
            signed = await asyncio.gather(
                *(
                    w.call("sign_pool", first=w.index, count=records, step=step, epoch=epoch)
                    for w in workers
                )
            )
            kids = [answer["kid"] for answer in signed]
            signatures = bytearray(64 * records)
            for w, answer in zip(workers, signed, strict=True):
                raw = base64.b64decode(answer["sigs"])
                for n, index in enumerate(range(w.index, records, step)):
                    signatures[index * 64 : (index + 1) * 64] = raw[n * 64 : (n + 1) * 64]
            PROGRESS.set(f"preloading {records} records ({preload}/node) into the stores")

            def sigs_for(holdings: dict[str, list[int]]) -> str:
                needed = sorted({i for indices in holdings.values() for i in indices})
                return base64.b64encode(
                    b"".join(signatures[i * 64 : (i + 1) * 64] for i in needed)
                ).decode()

            written = await asyncio.gather(
                *(
                    workers[w].call("preload", holdings=h, kids=kids, epoch=epoch, sigs=sigs_for(h))
                    for w, h in per_worker.items()
                )
            )
            self.result["preload_records"] = records
            self.result["preload_held"] = sum(written)
        elif preload:
            puts = math.ceil(self.count * preload / OPENDHT_COPIES)
            if puts > self.options.opendht_preload_budget:
                self.result["skipped"] = (
                    f"preload needs {puts} puts, over --opendht-preload-budget"
                    f" {self.options.opendht_preload_budget}"
                )
                return False
            jobs = [
                (self.rng.choice(overlay.alive()), f"sip:pre-{self.tag}-{i}@{DOMAIN}")
                for i in range(puts)
            ]
            PROGRESS.set(f"preloading by {puts} puts", puts)
            await overlay.prepare(jobs)
            stats = await self.batch("put", [(i, a, "") for i, a in jobs], inflight=64)
            self.result["preload_records"] = puts
            self.result["preload_puts_ok"] = stats.ok
        self.result["preload_s"] = time.monotonic() - t
        return True

    async def quiesce(self) -> None:
        """Wait (at most ``--quiesce`` s) until the overlay uses under ``--quiet-cpu``
        percent of a core: joins and preloads leave replication behind them."""
        PROGRESS.set("waiting for the overlay to quiesce")
        started = time.monotonic()
        before = await self.overlay.counters()
        while time.monotonic() - started < self.options.quiesce:
            await asyncio.sleep(2.0)
            now = await self.overlay.counters()
            busy = (now.cpu - before.cpu) / 2.0 * 100
            before = now
            if busy < self.options.quiet_cpu:
                break
        self.result["quiesce_s"] = time.monotonic() - started

    async def idle(self) -> None:
        PROGRESS.set(f"idle {self.options.idle:.0f} s")
        before = await self.overlay.counters()
        await asyncio.sleep(self.options.idle)
        cost = await self.overlay.counters() - before
        alive = len(self.overlay.alive())
        self.result["idle"] = {
            "cpu_percent": cost.cpu / self.options.idle * 100,
            "cpu_us_per_node_s": cost.cpu / self.options.idle / alive * 1e6,
            "rpcs_per_s": cost.rpcs / self.options.idle,
        }

    async def phase(
        self, name: str, jobs: list[tuple[int, str, str]], op: str, *, sequential: bool
    ) -> OpStats:
        """Run ``jobs`` (node, AOR, expected) one at a time or 20 in flight, within the
        phase deadline, with the overlay's CPU and RPCs around them."""
        PROGRESS.set(name, len(jobs))
        await asyncio.sleep(0.2)  # let the tail of the previous phase finish
        profile = self.options.profile is not None and sequential
        if profile:
            await asyncio.gather(*(w.call("profile") for w in self.overlay.workers))
        before = await self.overlay.counters()
        stats = OpStats()
        t = time.monotonic()
        if sequential:
            deadline = t + self.options.phase_timeout
            for index, aor, expect in jobs:
                if time.monotonic() > deadline:
                    stats.unfinished += 1
                    continue
                stats.add(await self.overlay.op(op, index, aor, expect), aor)
        else:
            stats = await self.batch(op, jobs, inflight=INFLIGHT, stats=stats)
        stats.wall = time.monotonic() - t
        await asyncio.sleep(0.2)
        stats.cost = await self.overlay.counters() - before
        if profile:
            await self.dump_profiles(name)
        return stats

    async def dump_profiles(self, phase: str) -> None:
        """Merge the workers' profiles of ``phase`` into one file, and print its top."""
        folder: Path = self.options.profile
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{self.tag}-{phase}-w{w.index}.prof" for w in self.overlay.workers]
        await asyncio.gather(
            *(
                w.call("profile", path=str(p))
                for w, p in zip(self.overlay.workers, paths, strict=True)
            )
        )
        merged = pstats.Stats(*(str(p) for p in paths if p.exists()), stream=sys.stderr)
        out = folder / f"{self.tag}-{phase}.prof"
        merged.dump_stats(str(out))
        for p in paths:
            p.unlink(missing_ok=True)
        print(
            f"\n-- profile of {self.engine} {phase}, N={self.count} R={self.preload}: {out}",
            file=sys.stderr,
        )
        merged.sort_stats("tottime").print_stats(20)

    async def batch(
        self,
        op: str,
        jobs: list[tuple[int, str, str]],
        *,
        inflight: int,
        stats: OpStats | None = None,
    ) -> OpStats:
        stats = stats or OpStats()
        limit = asyncio.Semaphore(inflight)
        deadline = time.monotonic() + self.options.phase_timeout

        async def one(index: int, aor: str, expect: str) -> None:
            async with limit:
                if time.monotonic() > deadline:
                    stats.unfinished += 1
                    return
                stats.add(await self.overlay.op(op, index, aor, expect), aor)

        await asyncio.gather(*(one(*job) for job in jobs))
        return stats

    async def operations(self) -> None:
        overlay, options = self.overlay, self.options
        alive = overlay.alive()
        seq = [
            (self.rng.choice(alive), f"sip:u-{self.tag}-{i}@{DOMAIN}") for i in range(options.ops)
        ]
        tput = [
            (self.rng.choice(alive), f"sip:t-{self.tag}-{i}@{DOMAIN}")
            for i in range(options.tput_ops)
        ]
        expect = await overlay.prepare(seq + tput)
        puts = await self.phase("put", [(i, a, "") for i, a in seq], "put", sequential=True)
        self.result["put"] = puts.summary()
        origin = dict((a, i) for i, a in seq)
        gets = [(self.other(origin[a]), a, expect[a]) for a in puts.succeeded]
        self.result["get"] = (await self.phase("get", gets, "get", sequential=True)).summary()
        jobs = [(i, a, "") for i, a in tput]
        flight = await self.phase("put, 20 in flight", jobs, "put", sequential=False)
        self.result["put_20"] = flight.summary()
        self.written = [(a, expect[a]) for a in puts.succeeded + flight.succeeded]

    def other(self, index: int) -> int:
        alive = self.overlay.alive()
        choice = self.rng.choice(alive)
        while choice == index and len(alive) > 1:
            choice = self.rng.choice(alive)
        return choice

    async def churn(self) -> None:
        overlay, options = self.overlay, self.options
        if not self.written:
            return
        victims = self.rng.sample(overlay.alive(), round(KILL_FRACTION * self.count))
        PROGRESS.set(f"killing {len(victims)} nodes")
        await overlay.kill(victims)
        alive = overlay.alive()
        buckets: dict[int, OpStats] = {}
        PROGRESS.set(
            f"churn: gets for {options.churn_seconds:.0f} s",
            int(options.churn_seconds * options.churn_rate),
        )
        before = await overlay.counters()
        start = time.monotonic()
        limit = asyncio.Semaphore(options.churn_inflight)
        tasks = []

        async def one(bucket: int, index: int, aor: str, expect: str) -> None:
            try:
                result = await overlay.op("get", index, aor, expect)
            finally:
                limit.release()
            buckets.setdefault(bucket, OpStats()).add(result, aor)

        n = 0
        while (elapsed := time.monotonic() - start) < options.churn_seconds:
            due = start + n / options.churn_rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            await limit.acquire()
            aor, expect = self.rng.choice(self.written)
            bucket = int(elapsed // options.bucket)
            tasks.append(asyncio.create_task(one(bucket, self.rng.choice(alive), aor, expect)))
            n += 1
        await asyncio.gather(*tasks)
        cost = await overlay.counters() - before
        self.result["churn"] = {
            "killed": len(victims),
            "timeouts": cost.timeouts,
            "buckets": [
                {"from_s": b * options.bucket, **buckets[b].summary()} for b in sorted(buckets)
            ],
        }


# -- output ------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def tables(rows: list[Json], bucket: float) -> Iterator[str]:
    yield "| engine | nodes | records/node | op | ok | p50 ms | p99 ms | CPU ms/op | RPCs/op |"
    yield "|---|---|---|---|---|---|---|---|---|"
    for r in rows:
        if "skipped" in r:
            yield f"| {r['engine']} | {r['nodes']} | {r['preload']} | ({r['skipped']}) |||||"
            continue
        for op in ("put", "get", "put_20"):
            s = r.get(op)
            if not s:
                continue
            ok = f"{s['ok']}/{s['issued']}" + (
                f" (+{s['unfinished']} not run)" if s["unfinished"] else ""
            )
            name = "put, 20 in flight" if op == "put_20" else op
            yield (
                f"| {r['engine']} | {r['nodes']} | {r['preload']} | {name} | {ok} "
                f"| {fmt(s['p50_ms'])} | {fmt(s['p99_ms'])} | {fmt(s['cpu_ms_per_op'])} "
                f"| {fmt(s['rpcs_per_op'])} |"
            )
    yield ""
    yield (
        "| engine | nodes | records/node | build s | quiesce s | peers | idle CPU % "
        "| puts/s (20 in flight) |"
    )
    yield "|---|---|---|---|---|---|---|---|"
    for r in rows:
        if "skipped" in r or "put_20" not in r:
            continue
        yield (
            f"| {r['engine']} | {r['nodes']} | {r['preload']} | {fmt(r['build_s'])} "
            f"| {fmt(r.get('quiesce_s'))} | {fmt(r.get('peers_mean'))} "
            f"| {fmt(r['idle']['cpu_percent'])} "
            f"| {fmt(r['put_20']['ops_per_s'])} |"
        )
    yield ""
    width = max((len(r["churn"]["buckets"]) for r in rows if "churn" in r), default=0)
    heads = " | ".join(f"{i * bucket:.0f}-{(i + 1) * bucket:.0f} s" for i in range(width))
    yield f"| engine | nodes | records/node | killed | {heads} |"
    yield "|---|---|---|---|" + "---|" * width
    for r in rows:
        if "churn" not in r:
            continue
        cells = []
        for b in r["churn"]["buckets"]:
            rate = b["ok"] / b["issued"] * 100 if b["issued"] else 0
            cells.append(f"{rate:.1f}% / {fmt(b['p50_ms'])} ms")
        yield (
            f"| {r['engine']} | {r['nodes']} | {r['preload']} | {r['churn']['killed']} | "
            + " | ".join(cells)
            + " |"
        )


def machine() -> Json:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "dht_adaptor"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "commit": commit + (" + uncommitted dht_adaptor changes" if dirty else ""),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def opendht_available() -> bool:
    try:
        import opendht  # noqa: F401
    except ImportError:
        return False
    return True


async def main(options: argparse.Namespace) -> int:
    engines = list(options.engines)
    if "opendht" in engines and not opendht_available():
        print("OpenDHT is not installed (pip install opendht==4.4.2): p2psip only", file=sys.stderr)
        engines.remove("opendht")
    info = {"machine": machine(), "options": {k: v for k, v in vars(options).items()}}
    rows: list[Json] = []
    for count in options.nodes:
        for preload in options.preload:
            for engine in engines:
                try:
                    rows.append(await Run(engine, count, preload, options).run())
                except WorkerError as exc:
                    rows.append(
                        {"engine": engine, "nodes": count, "preload": preload, "skipped": str(exc)}
                    )
                PROGRESS.finish()
                if options.json:
                    write_json(options.json, info, rows)
    info["machine"]["load_average_after"] = os.getloadavg()
    print(f"\n{info['machine']}\n")
    print("\n".join(tables(rows, options.bucket)))
    if options.json:
        write_json(options.json, info, rows)
    return 0


def write_json(path: Path, info: Json, rows: list[Json]) -> None:
    path.write_text(json.dumps({**info, "runs": rows}, indent=1, default=str) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x.replace("_", "")) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=ints, default=[30, 100, 300, 1000])
    parser.add_argument("--preload", type=ints, default=[0, 1000, 10000], help="records per node")
    parser.add_argument("--engines", type=lambda t: t.split(","), default=["p2psip", "opendht"])
    parser.add_argument("--procs", type=int, default=10, help="worker processes")
    parser.add_argument("--ops", type=int, default=200, help="sequential puts, then gets")
    parser.add_argument("--tput-ops", type=int, default=400, help="puts with 20 in flight")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured")
    parser.add_argument("--churn-seconds", type=float, default=60.0)
    parser.add_argument("--churn-rate", type=float, default=10.0, help="gets per second")
    parser.add_argument("--churn-inflight", type=int, default=50)
    parser.add_argument("--bucket", type=float, default=10.0, help="churn report interval, s")
    parser.add_argument("--phase-timeout", type=float, default=240.0, help="per phase, s")
    parser.add_argument("--op-timeout", type=float, default=30.0, help="per operation, s")
    parser.add_argument("--settle", type=float, default=3.0, help="OpenDHT join settling, s")
    parser.add_argument(
        "--join-concurrency", type=int, default=8, help="nodes joining at once per worker"
    )
    parser.add_argument(
        "--preload-at",
        choices=("joined", "start"),
        default="joined",
        help="p2psip: preload once joined (steady state) or before the nodes listen",
    )
    parser.add_argument("--quiesce", type=float, default=120.0, help="max wait after build, s")
    parser.add_argument("--quiet-cpu", type=float, default=25.0, help="%% of a core: quiet")
    parser.add_argument("--republish", type=float, default=86400.0, help="p2psip, s")
    parser.add_argument("--opendht-preload-budget", type=int, default=130_000, help="puts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--profile", type=Path, help="folder: cProfile the workers during put and get"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 nodes, 2 procs")
    parser.add_argument("-v", "--verbose", action="store_true", help="workers log at INFO")
    options = parser.parse_args(argv)
    if options.quick:
        options.nodes, options.preload, options.procs = [20], [0, 100], 2
        options.ops, options.tput_ops, options.idle = 20, 40, 0.5
        options.churn_seconds, options.bucket, options.settle = 4.0, 2.0, 1.0
        options.phase_timeout, options.op_timeout, options.quiesce = 20.0, 10.0, 6.0
        options.opendht_preload_budget = 300
    return options


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))

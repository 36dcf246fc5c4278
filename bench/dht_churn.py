"""DHT put/get latency and failure rate when nodes die: kademlia 2.2.3 against DhtNode.

Builds an overlay of ``--nodes`` nodes on loopback (one process, one event loop), stores
``--ops`` records, kills 0 %, 20 % and 33 % of the nodes (closing their sockets, so RPCs to
them time out as to a crashed host), then measures ``--ops`` puts of new records and gets
of every record from random survivors. Each (config, loss) pair gets a fresh overlay.

Configs:
  kademlia       plain kademlia.network.Server (5 s RPC timeout, lookups in rounds,
                 first value wins); a get "fails" if it returns None or a wrong value
  dht-5s         DhtNode, rpc_timeout 5 s, no hedging
  dht-0.5s       DhtNode, rpc_timeout 0.5 s, no hedging
  dht-0.5s+hedge DhtNode defaults: rpc_timeout 0.5 s, stragglers set aside after a few RTTs

With ``--settle S``, every get is timed again S seconds after the loss (issue 11: gets
must return to their pre-loss latency within a minute, not re-learn dead contacts).

Run:  .venv/bin/python bench/dht_churn.py [--nodes 40] [--ops 20] [--configs ...] [--settle 30]
Not a test: numbers depend on the machine; bench/README.md records some.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kademlia.network import Server

from dht_adaptor.keys import SiteKey, TrustStore, sign_binding
from dht_adaptor.node import DhtError, DhtNode
from dht_adaptor.record import DhtBinding, encode_record, new_binding
from dht_adaptor.record_store import MemoryRecordStore

CONFIGS = ("kademlia", "dht-5s", "dht-0.5s", "dht-0.5s+hedge")
LOSSES = (0.0, 0.2, 1 / 3)
OP_GUARD = 120.0  # seconds; an operation taking longer counts as failed


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    def row(self) -> str:
        lat = sorted(self.latencies)
        if not lat:
            return "| - | - | - | - |"

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))]

        return (
            f"| {statistics.median(lat):.3f} | {pct(0.9):.3f} | {pct(0.99):.3f} | {lat[-1]:.3f} |"
        )

    @property
    def count(self) -> int:
        return len(self.latencies)


class Overlay:
    """put/get over either plain kademlia servers or DhtNodes."""

    def __init__(self, config: str, key: SiteKey, trust: TrustStore) -> None:
        self.config = config
        self.key = key
        self.trust = trust
        self.members: list[Any] = []
        self.dead: set[int] = set()

    async def build(self, count: int) -> None:
        for _ in range(count):
            if self.config == "kademlia":
                server = Server(ksize=20, alpha=3)
                await server.listen(0, interface="127.0.0.1")
                port = server.transport.get_extra_info("sockname")[1]
                member: Any = (server, ("127.0.0.1", port))
            else:
                timeout = 5.0 if self.config == "dht-5s" else 0.5
                node = DhtNode(
                    MemoryRecordStore(self.trust),
                    self.trust,
                    key=self.key,
                    rpc_timeout=timeout,
                    hedge=self.config.endswith("+hedge"),
                )
                await node.listen("127.0.0.1", 0)
                member = (node, node.address)
            seeds = [address for _, address in self.members[:2]]
            self.members.append(member)
            if seeds:
                await member[0].bootstrap(seeds)
        # Let the early members learn of the late ones (as table refreshes would).
        last = self.members[-1][1]
        await asyncio.gather(*(m.bootstrap([last]) for m, _ in self.members[:-1]))

    def alive(self) -> list[int]:
        return [i for i in range(len(self.members)) if i not in self.dead]

    async def kill(self, fraction: float, rng: random.Random) -> None:
        victims = rng.sample(range(len(self.members)), round(fraction * len(self.members)))
        for i in victims:
            self.dead.add(i)
            member = self.members[i][0]
            if isinstance(member, DhtNode):
                await member.close()
            else:
                member.stop()

    def binding(self, aor: str) -> DhtBinding:
        unsigned = new_binding(
            aor=aor,
            contact=aor.replace("@", "@10.0.0.1;u="),
            home="sip:proxy.bench.example.com",
            site="bench",
            version=1,
            now=time.time(),
            expires=3600,
        )
        return sign_binding(unsigned, self.key)

    async def put(self, index: int, binding: DhtBinding) -> bool:
        member = self.members[index][0]
        if isinstance(member, DhtNode):
            try:
                return await member.put(binding.aor, [binding]) > 0
            except DhtError:
                return False
        return bool(await member.set(binding.aor, encode_record([binding])))

    async def get(self, index: int, binding: DhtBinding) -> bool:
        member = self.members[index][0]
        if isinstance(member, DhtNode):
            try:
                return await member.get(binding.aor) == (binding,)
            except DhtError:
                return False
        return bool(await member.get(binding.aor) == encode_record([binding]))

    def rpc_timeouts(self) -> int:
        return sum(
            int(m.stats()["rpc_timeouts"]) for m, _ in self.members if isinstance(m, DhtNode)
        )

    async def close(self) -> None:
        for member, _ in self.members:
            if isinstance(member, DhtNode):
                await member.close()
            else:
                member.stop()


async def timed(op: Callable[[], Awaitable[bool]], samples: Samples) -> None:
    started = time.perf_counter()
    try:
        ok = await asyncio.wait_for(op(), OP_GUARD)
    except TimeoutError:
        ok = False
    samples.latencies.append(time.perf_counter() - started)
    if not ok:
        samples.failures += 1


async def scenario(
    config: str, loss: float, args: argparse.Namespace, key: SiteKey, trust: TrustStore
) -> tuple[Samples, Samples, Samples, int]:
    rng = random.Random(args.seed)
    overlay = Overlay(config, key, trust)
    try:
        await overlay.build(args.nodes)
        limit = asyncio.Semaphore(args.concurrency)

        async def setup(binding: DhtBinding) -> None:
            async with limit:
                await overlay.put(rng.randrange(args.nodes), binding)

        before = [overlay.binding(f"sip:old{i}@bench.example.com") for i in range(args.ops)]
        await asyncio.gather(*(setup(b) for b in before))
        await overlay.kill(loss, rng)
        puts, gets = Samples(), Samples()

        async def limited(kind: str, binding: DhtBinding) -> None:
            op = overlay.put if kind == "put" else overlay.get
            index = rng.choice(alive)
            async with limit:
                await timed(lambda: op(index, binding), puts if kind == "put" else gets)

        after = [overlay.binding(f"sip:new{i}@bench.example.com") for i in range(args.ops)]
        alive = overlay.alive()
        await asyncio.gather(*(limited("put", b) for b in after))
        await asyncio.gather(*(limited("get", b) for b in before + after))
        settled = Samples()
        if args.settle > 0 and loss > 0:
            await asyncio.sleep(args.settle)

            async def again(binding: DhtBinding) -> None:
                index = rng.choice(alive)
                async with limit:
                    await timed(lambda: overlay.get(index, binding), settled)

            await asyncio.gather(*(again(b) for b in before + after))
        return puts, gets, settled, overlay.rpc_timeouts()
    finally:
        await overlay.close()


async def main(args: argparse.Namespace) -> None:
    key = SiteKey.generate()
    trust = TrustStore({key.key_id: key.public_bytes})
    print(
        f"{args.nodes} nodes, kademlia k=20, DhtNode k=8 (defaults), alpha=3; "
        f"per cell {args.ops} puts and {2 * args.ops} gets "
        f"from random survivors, {args.concurrency} at a time; latencies in seconds\n"
    )
    print("| config | nodes lost | op | p50 | p90 | p99 | max | failed | rpc timeouts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        for loss in LOSSES:
            started = time.perf_counter()
            puts, gets, settled, timeouts = await scenario(config, loss, args, key, trust)
            rows = [("put", puts), ("get", gets)]
            if settled.count:
                rows.append((f"get +{args.settle:.0f}s", settled))
            for name, samples in rows:
                failed = f"{samples.failures}/{samples.count}"
                print(
                    f"| {config} | {loss:.0%} | {name} {samples.row()} {failed} "
                    f"| {timeouts if config != 'kademlia' else '-'} |",
                    flush=True,
                )
            logging.getLogger(__name__).info(
                "%s %.0f%%: %.1f s", config, loss * 100, time.perf_counter() - started
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=40)
    parser.add_argument("--ops", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=0.0, help="time gets again after S s")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    options = parse_args()
    # kademlia/rpcudp log every timeout at warning/error: keep the table readable.
    logging.basicConfig(level=logging.INFO if options.verbose else logging.CRITICAL)
    if not options.verbose:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    asyncio.run(main(options))

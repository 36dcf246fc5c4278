"""What authenticating DHT RPCs costs: sign + verify per datagram, per RPC in one process
and across two processes, with and without the membership signatures.

Three measurements:

  datagram   Member.seal (one Ed25519 signature) and open_datagram (one verification)
             of a ping request (~60 bytes) and of a find_value answer holding a record
             of 1 binding (~0.5 KB) and of a full record (~7 KB)
  in-process two DhtNodes on loopback in one event loop; sequential pings and
             find_values: latency, and CPU per RPC (both nodes: 2 seals + 2 opens)
  processes  a server DhtNode in a child process (this script with --serve); the client
             here sends sequential RPCs: latency, client CPU and server CPU per RPC

"plain" is the same code with the signature replaced by 64 zero bytes and not verified:
the same datagrams on the wire, so the difference is the cryptography alone. "auth" signs
every datagram (``DhtNode(sessions=False)``, the closed overlay of issue 10); "session"
is the default since issue 11: one signed exchange per pair of nodes, then HMAC-SHA256.

Run:  .venv/bin/python bench/dht_rpc_cost.py [--rpcs 2000]
Not a test: numbers depend on the machine; bench/README.md records some.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kademlia.node import Node

import dht_adaptor.session
from dht_adaptor import membership
from dht_adaptor.keys import SiteKey, TrustStore, sign_binding
from dht_adaptor.membership import Member, Sender, node_id_of, open_datagram
from dht_adaptor.node import DhtNode
from dht_adaptor.record import (
    MAX_RECORD_BYTES,
    RecordTooLarge,
    dht_key,
    encode_record,
    new_binding,
)
from dht_adaptor.record_store import MemoryRecordStore

AOR = "sip:bench@example.com"
MODES = ("plain", "auth", "session")


# -- "plain": the same framing, no cryptography --------------------------------------


def _seal_plain(self: Member, datagram: bytes, now: float) -> bytes:
    header = self._prefix + int(now * 1000).to_bytes(8, "big")
    return header + bytes(membership.SIGNATURE_BYTES) + datagram


def _open_plain(data: bytes, trust: TrustStore, now: float, window: float = 60.0) -> Sender:
    key_id = data[2:10].hex()
    public = trust.public_bytes(key_id)
    assert public is not None
    return Sender(key_id, node_id_of(public, data[10:18]), data[membership.OVERHEAD :])


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """Within: DHT nodes of this process seal and open as ``name`` says."""
    if name in ("auth", "session"):
        yield
        return
    seal, opener = Member.seal, dht_adaptor.session.open_datagram
    Member.seal = _seal_plain  # type: ignore[method-assign]
    dht_adaptor.session.open_datagram = _open_plain  # type: ignore[assignment]
    try:
        yield
    finally:
        Member.seal = seal  # type: ignore[method-assign]
        dht_adaptor.session.open_datagram = opener


# -- records ---------------------------------------------------------------------------


def record(key: SiteKey, bindings: int) -> bytes:
    signed = [
        sign_binding(
            new_binding(
                aor=AOR, contact=f"sip:bench@10.0.{i // 256}.{i % 256}:5060;transport=udp",
                home="sip:proxy.paris.example.com:5060", site="paris", version=1,
                now=time.time(), expires=3600,
            ),
            key,
        )
        for i in range(bindings)
    ]  # fmt: skip
    return encode_record(signed)


def full_record(key: SiteKey) -> bytes:
    """The largest record of bindings like these that one store RPC carries."""
    n = 1
    with contextlib.suppress(RecordTooLarge):
        while len(record(key, n + 1)) <= MAX_RECORD_BYTES:
            n += 1
    return record(key, n)


# -- 1. per datagram -----------------------------------------------------------------


def per_op(op: Callable[[], object], repeat: int) -> float:
    """Median microseconds of ``op`` over 5 runs of ``repeat`` calls."""
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            op()
        runs.append((time.perf_counter() - started) / repeat * 1e6)
    return statistics.median(runs)


def datagrams(key: SiteKey, trust: TrustStore, repeat: int) -> None:
    from dht_adaptor.wire import pack

    member = Member(key, b"benchsal")
    now = time.time()
    ping = b"\x00" + os.urandom(20) + pack(["ping", [member.node_id]])
    cases = {
        "ping request": ping,
        "find_value answer, 1 binding": b"\x01" + os.urandom(20) + pack({"value": record(key, 1)}),
        "find_value answer, full record": b"\x01"
        + os.urandom(20)
        + pack({"value": full_record(key)}),
    }
    print("| datagram | bytes | seal (sign) µs | open (verify) µs |")
    print("|---|---|---|---|")
    for name, data in cases.items():
        sealed = member.seal(data, now)
        seal = per_op(lambda d=data: member.seal(d, now), repeat)
        opened = per_op(lambda s=sealed: open_datagram(s, trust, now), repeat)
        print(f"| {name} | {len(sealed)} | {seal:.1f} | {opened:.1f} |")
    print()


# -- 2. and 3. RPCs ------------------------------------------------------------------


def latency_row(
    label: str, latencies: list[float], cpu: float, server_cpu: float | None = None
) -> str:
    lat = sorted(latencies)
    p50, p90 = lat[len(lat) // 2], lat[int(0.9 * len(lat))]
    server = "" if server_cpu is None else f" {server_cpu * 1e6:.0f} |"
    return f"| {label} | {p50 * 1e6:.0f} | {p90 * 1e6:.0f} | {cpu / len(lat) * 1e6:.0f} |{server}"


async def timed_rpcs(call: Callable[[], Awaitable[tuple[bool, object]]], n: int) -> list[float]:
    for _ in range(min(200, n)):  # warm up (RTT samples, caches)
        assert (await call())[0]
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        ok, _ = await call()
        latencies.append(time.perf_counter() - started)
        assert ok
    return latencies


def calls(client: DhtNode, server: Node) -> dict[str, Callable[[], Awaitable[tuple[bool, object]]]]:
    protocol = client._protocol
    target = Node(dht_key(AOR))
    return {
        "ping": lambda: protocol.call_ping(server),
        "find_value (1 binding)": lambda: protocol.call_find_value(server, target),
    }


async def in_process(key: SiteKey, trust: TrustStore, n: int) -> None:
    print("In one process (client and server nodes share the CPU: 2 seals + 2 opens per RPC)\n")
    print("| mode, RPC | p50 µs | p90 µs | CPU µs/RPC |")
    print("|---|---|---|---|")
    for name in MODES:
        with mode(name):
            store = MemoryRecordStore(trust)
            sessions = name == "session"
            server = DhtNode(store, trust, key=key, sessions=sessions)
            client = DhtNode(MemoryRecordStore(trust), trust, key=key, sessions=sessions)
            try:
                await server.listen("127.0.0.1", 0)
                await client.listen("127.0.0.1", 0)
                assert (await store.merge_in(dht_key(AOR), record(key, 1), time.time())).ok
                there = Node(server.node_id, *server.address)
                for rpc, call in calls(client, there).items():
                    cpu = time.process_time()
                    latencies = await timed_rpcs(call, n)
                    cpu = time.process_time() - cpu
                    # (the warm-up RPCs count in the CPU time: scale them in)
                    print(latency_row(f"{name}, {rpc}", latencies, cpu * n / (n + min(200, n))))
            finally:
                await client.close()
                await server.close()
    print()


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def across_processes(data: Path, key: SiteKey, trust: TrustStore, n: int) -> None:
    print("Across two processes (the server in a child process; CPU per RPC of each side)\n")
    print("| mode, RPC | p50 µs | p90 µs | client CPU µs/RPC | server CPU µs/RPC |")
    print("|---|---|---|---|---|")
    for name in MODES:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", name, "--data", str(data)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            with mode(name):
                client = DhtNode(
                    MemoryRecordStore(trust), trust, key=key, sessions=name == "session"
                )
                try:
                    await client.listen("127.0.0.1", 0)
                    server_id = await client._protocol.ping_address(("127.0.0.1", port))
                    assert server_id is not None
                    there = Node(server_id, "127.0.0.1", port)
                    for rpc, call in calls(client, there).items():
                        await timed_rpcs(call, min(200, n))  # warm up
                        cpu, their = time.process_time(), cpu_of(server.pid)
                        latencies = []
                        for _ in range(n):
                            started = time.perf_counter()
                            ok, _ = await call()
                            latencies.append(time.perf_counter() - started)
                            assert ok
                        cpu, their = time.process_time() - cpu, cpu_of(server.pid) - their
                        print(latency_row(f"{name}, {rpc}", latencies, cpu, their / n))
                finally:
                    await client.close()
        finally:
            server.terminate()
            server.wait(10)
    print()


async def serve(name: str, data: Path) -> None:
    key = SiteKey.load(data)
    trust = TrustStore.from_dir(None, key)
    with mode(name):
        store = MemoryRecordStore(trust)
        node = DhtNode(store, trust, key=key, sessions=name == "session")
        port = await node.listen("127.0.0.1", 0)
        assert (await store.merge_in(dht_key(AOR), record(key, 1), time.time())).ok
        print(port, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await node.close()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        key = SiteKey.load_or_create(data)
        trust = TrustStore.from_dir(None, key)
        print(f"Ed25519 via cryptography; {args.rpcs} sequential RPCs per row, loopback\n")
        datagrams(key, trust, args.repeat)
        await in_process(key, trust, args.rpcs)
        await across_processes(data, key, trust, args.rpcs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpcs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=2000, help="per-datagram iterations")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(options.serve, options.data))
    else:
        asyncio.run(main(options))

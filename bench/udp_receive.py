"""What one received UDP datagram costs the proxy's process: asyncio's datagram transport
against the transport's own reader (proxy/transport.py), for a blocked source and for
datagrams handed on. Run by hand, never under pytest::

    .venv/bin/python bench/udp_receive.py [--rate 100000] [--seconds 3] [--repeat 3]

Each case runs a receiver in a child process (an event loop and nothing else) while
bench/udp_flood.py sends ``rate x seconds`` REGISTERs from 127.0.0.9 to it. The receiver
reports how many datagrams it handled and its own CPU time (user + system, which includes
the kernel's receive path and epoll) from the first datagram to the last; the cost per
datagram is one over the other. A receiver that cannot keep up runs at 100% and the
kernel drops the rest (handled < sent): the cost per handled datagram still holds.

Cases:

* ``asyncio, blocked``: ``loop.create_datagram_endpoint`` (one datagram per wake-up),
  ``datagram_received`` asking the FloodGuard, which says no (the source is blocked).
* ``reader, blocked``: TransportLayer with the FloodGuard: ``recvmsg_into`` a reused
  buffer, nothing copied for a blocked source, up to UDP_BUDGET per wake-up.
* ``asyncio, delivered``: asyncio's transport making a Flow and calling the handler
  (what the transport did before).
* ``reader, delivered``: TransportLayer without guard: copy, kernel timestamp to the
  overload EWMA, Flow, handler.
* ``reader, delivered, budget 1``: the same reading one datagram per wake-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = (
    "asyncio, blocked",
    "reader, blocked",
    "asyncio, delivered",
    "reader, delivered",
    "reader, delivered, budget 1",
)
QUIET = 0.5  # seconds without a datagram that end a receiver's run


async def receive(case: str) -> dict[str, float]:
    import proxy.transport as transport_module
    from proxy.flood import FloodGuard
    from proxy.overload import OverloadControl
    from proxy.transport import UDP_RCVBUF, Flow, TransportLayer

    loop = asyncio.get_running_loop()
    handled = 0
    first: list[float] = []  # CPU time at the first datagram

    def on_message(data: bytes, flow: Flow) -> None:
        nonlocal handled
        handled += 1
        if not first:
            first.append(time.process_time())

    guard = FloodGuard(1, 60.0, 600.0)
    guard.admit("127.0.0.9", loop.time())
    guard.admit("127.0.0.9", loop.time())  # blocked from now on
    assert guard.blocked("127.0.0.9", loop.time())
    blocked = "blocked" in case
    closer: object
    if case.startswith("asyncio"):

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                if blocked and not guard.admit(str(addr[0]), loop.time()):
                    if not first:
                        first.append(time.process_time())
                    return
                on_message(data, Flow("udp", str(addr[0]), int(addr[1])))

        udp, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
        sock = udp.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)  # as the transport
        port = udp.get_extra_info("sockname")[1]
        closer = udp
    else:
        if "budget 1" in case:
            transport_module.UDP_BUDGET = 1
        layer = TransportLayer(
            on_message,
            flood=guard if blocked else None,
            overload=None if blocked else OverloadControl(1.0, 10**9, lambda: 0),
        )
        if blocked:
            # Count what the guard dropped as "handled" (first/last from the flood counts).
            real_admit = guard.admit

            def admit(host: str, now: float) -> bool:
                if not first:
                    first.append(time.process_time())
                return real_admit(host, now)

            guard.admit = admit  # type: ignore[method-assign]
        port = await layer.start("127.0.0.1", 0)
        closer = layer
    print(port, flush=True)
    # Wait for the flood, then until it has been quiet for QUIET seconds.
    while not first:
        await asyncio.sleep(0.01)
    idle_since = time.monotonic()
    seen = -1
    while True:
        await asyncio.sleep(0.05)
        count = guard.dropped if blocked else handled
        if count != seen:
            seen, idle_since = count, time.monotonic()
            cpu_end = time.process_time()
        elif time.monotonic() - idle_since > QUIET:
            break
    count = guard.dropped - 1 if blocked else handled  # minus the set-up block
    cpu = cpu_end - first[0]
    if isinstance(closer, TransportLayer):
        await closer.close()
    else:
        closer.close()  # type: ignore[attr-defined]
    per = round(cpu / count * 1e6, 2)
    return {"handled": count, "cpu_s": round(cpu, 3), "us_per_datagram": per}


def run_case(case: str, rate: int, seconds: float) -> dict[str, float]:
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--receiver", case],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert receiver.stdout is not None
    port = int(receiver.stdout.readline())
    sender = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "udp_flood.py"), "--target", f"127.0.0.1:{port}",
         "--rate", str(rate), "--duration", str(seconds), "--count", str(int(rate * seconds))],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    )  # fmt: skip
    sent = json.loads(sender.stdout)
    out, _ = receiver.communicate(timeout=30)
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    result["sent"] = sent["sent"]
    result["send_rate"] = sent["rate"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=100000)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))),
                   help="which cases, by number (default: all)")  # fmt: skip
    p.add_argument("--receiver", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.receiver:
        print(json.dumps(asyncio.run(receive(args.receiver))), flush=True)
        return 0
    print(f"# {args.rate}/s for {args.seconds} s from 127.0.0.9, best of {args.repeat}")
    print("| case | sent | handled | µs/datagram (best) | µs/datagram (median) |")
    print("|---|---|---|---|---|")
    for case in (CASES[int(i)] for i in args.cases.split(",")):
        runs = [run_case(case, args.rate, args.seconds) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["us_per_datagram"])
        median = statistics.median(r["us_per_datagram"] for r in runs)
        print(f"| {case} | {best['sent']} | {best['handled']} | {best['us_per_datagram']} "
              f"| {median} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

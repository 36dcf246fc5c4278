"""REGISTER at 1x, 2x and 4x the registrar's capacity, with overload control and without:
does throughput level off (503s) or collapse (retransmissions)? Run by hand, never under
pytest::

    .venv/bin/python bench/overload.py                    # measure capacity, then 1x 2x 4x
    .venv/bin/python bench/overload.py --capacity 800     # skip the measurement
    .venv/bin/python bench/overload.py --modes on         # only with overload control

Each mode starts its own ``p2psip run`` on a free port of 127.0.0.1 (in-memory store, open
registration): ``on`` with the default overload settings, ``off`` with them raised out
of reach (``overload_queue_delay = 1000``, ``max_transactions = 10**9``), which is how
the proxy behaved before it had overload control. SIPp sends ``rate x duration``
REGISTERs for distinct users, open loop (``-l`` far above anything reached), over UDP,
with bench/register_503.xml: a 200 or a 503 both end a call; only no answer within
``--recv-timeout`` is a failure.

Capacity is what the proxy serves when saturated: unless ``--capacity`` is given, one
step at ``--probe-rate`` with overload control on, and its served rate (200s/s).

Columns:

* served/s: 200 OK to REGISTER per second (the proxy's /stats, ``registers_ok``, read
  once a second): while SIPp was sending (from its second second to its last), and
  over the whole step (SIPp's start to its exit: a proxy that falls behind stretches it);
* 503/s: requests answered 503 by overload control per second while SIPp was sending;
* failed: SIPp calls with no final answer within ``--recv-timeout``; retrans: SIPp's
  retransmissions (500 ms, 1 s, 2 s... without an answer); resp ms: SIPp's mean
  response time to the 200s;
* proxy CPU %, RSS after the step.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from register_rate import _seconds, cpu_seconds, free_port, rss_mb, start_p2psip

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = Path(__file__).resolve().parent / "register_503.xml"
TOKEN = "bench-overload-token"
MODES = {
    "on": "",
    "off": "overload_queue_delay = 1000.0\nmax_transactions = 1000000000\n",
}


@dataclass(frozen=True, slots=True)
class Step:
    mode: str
    multiple: float
    asked: int
    sent: int
    served: float
    served_step: float
    shed: float
    failed: int
    retrans: int
    wall_s: float
    resp_ms: float
    cpu_pct: float | None
    rss_mb: float | None


class StatsPoller:
    """Reads the proxy's /stats once a second in a thread: (time, counters) samples."""

    def __init__(self, admin: str) -> None:
        self.url = f"http://{admin}/stats"
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def get(self) -> dict[str, float]:
        req = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            counters: dict[str, float] = json.load(r)["counters"]
            return counters

    def __enter__(self) -> StatsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(), self.get()))
            self._stop.wait(1.0)

    def rate(self, name: str, start: float, end: float) -> float:
        """Counter ``name``'s rate between the first and last samples in [start, end]."""
        inside = [(t, c.get(name, 0.0)) for t, c in self.samples if start <= t <= end]
        if len(inside) < 2:
            return 0.0
        (t0, a), (t1, b) = inside[0], inside[-1]
        return (b - a) / (t1 - t0)


def run_step(
    args: argparse.Namespace, mode: str, port: int, admin: str, pid: int, rate: int,
    multiple: float, workdir: Path,
) -> Step:  # fmt: skip
    total = rate * args.duration
    name = f"{mode}_{rate}"
    inject = workdir / f"{name}_users.csv"
    inject.write_text("\n".join(["SEQUENTIAL", *(f"o{mode}{rate}u{n:06d}" for n in range(total))]))
    stats_file = workdir / f"{name}_stats.csv"
    sipp_port = free_port("127.0.0.1")
    command = [
        args.sipp, f"127.0.0.1:{port}", "-sf", str(SCENARIO), "-t", "u1",
        "-i", "127.0.0.1", "-p", str(sipp_port), "-bind_local",
        "-r", str(rate), "-m", str(total), "-l", "1000000", "-inf", str(inject),
        "-key", "domain", args.domain, "-key", "expires", "3600",
        "-key", "contact_port", str(sipp_port),
        "-default_behaviors", "all,-bye",
        "-recv_timeout", str(args.recv_timeout * 1000),
        "-timeout", f"{args.duration * 3 + args.recv_timeout + 30}s", "-timeout_error",
        "-nostdin", "-trace_stat", "-stf", str(stats_file), "-fd", "1",
    ]  # fmt: skip
    poller = StatsPoller(admin)
    before = poller.get()
    cpu_before = cpu_seconds([pid])
    with poller:
        started = time.monotonic()
        with (workdir / f"{name}.out").open("wb") as out:
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=False)
        wall = time.monotonic() - started
    after = poller.get()
    cpu_after = cpu_seconds([pid])
    rows = list(csv.reader(stats_file.read_text().splitlines(), delimiter=";"))
    last = dict(zip(rows[0], rows[-1], strict=False)) if len(rows) >= 2 else {}

    def count(column: str) -> int:
        value = last.get(column, "")
        return int(value) if value.isdigit() else 0

    sending = (started + 1.0, started + args.duration)  # skip SIPp's first second
    if args.series:
        print(f"# {name}: second, served/s, 503/s, queue delay ms (EWMA)")
        for (t0, a), (t1, b) in itertools.pairwise(poller.samples):
            dt = t1 - t0
            print(f"#   {t1 - started:5.1f} {(b['registers_ok'] - a['registers_ok']) / dt:7.0f} "
                  f"{(b['overload_rejected'] - a['overload_rejected']) / dt:7.0f} "
                  f"{b['queue_delay_ms']:5.0f}")  # fmt: skip
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return Step(
        mode=mode,
        multiple=multiple,
        asked=rate,
        sent=count("TotalCallCreated"),
        served=round(poller.rate("registers_ok", *sending), 1),
        served_step=round((after["registers_ok"] - before["registers_ok"]) / wall, 1),
        shed=round(poller.rate("overload_rejected", *sending), 1),
        failed=count("FailedCall(C)"),
        retrans=count("Retransmissions(C)"),
        wall_s=round(wall, 1),
        resp_ms=round(_seconds(last.get("ResponseTime1(C)", "")) * 1000, 1),
        cpu_pct=None if cpu is None else round(100 * cpu / wall, 1),
        rss_mb=rss_mb([pid]),
    )


COLUMNS = {
    "mode": "overload control",
    "multiple": "x capacity",
    "asked": "asked/s",
    "sent": "sent",
    "served": "served/s (sending)",
    "served_step": "served/s (step)",
    "shed": "503/s (sending)",
    "failed": "failed",
    "retrans": "retrans",
    "wall_s": "wall s",
    "resp_ms": "resp ms",
    "cpu_pct": "proxy CPU %",
    "rss_mb": "RSS MB",
}


def print_table(steps: list[Step]) -> None:
    print("| " + " | ".join(COLUMNS.values()) + " |")
    print("|" + "---|" * len(COLUMNS))
    for step in steps:
        cells = [getattr(step, name) for name in COLUMNS]
        print("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |", flush=True)


def start(mode: str, workdir: Path, domain: str) -> tuple[subprocess.Popen[bytes], int, str]:
    config = workdir / f"{mode}.toml"
    # SIPp sends everything from one address: no flood limit for this benchmark.
    config.write_text("[p2psip]\nflood_max_requests = 100000000\n" + MODES[mode])
    admin = f"127.0.0.1:{free_port('127.0.0.1')}"
    extra = ["--config", str(config), "--admin-listen", admin, "--admin-token", TOKEN]
    sub = workdir / mode
    sub.mkdir()
    proc, port = start_p2psip(sub, "127.0.0.1", domain, extra)
    return proc, port, admin


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capacity", type=int, help="REGISTER/s served at saturation (else measured)")
    p.add_argument("--probe-rate", type=int, default=2500, help="rate of the capacity probe")
    p.add_argument("--multiples", default="1,2,4")
    p.add_argument("--modes", default="on,off", help="on, off or both")
    p.add_argument("--duration", type=int, default=10, help="seconds per step")
    p.add_argument("--pause", type=float, default=10.0, help="seconds between steps")
    p.add_argument("--recv-timeout", type=int, default=10, help="seconds")
    p.add_argument("--domain", default="p2psip.test")
    p.add_argument("--sipp", default="sipp")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the logs")
    p.add_argument("--series", action="store_true", help="print each step second by second")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="p2psip-overload-"))
    steps: list[Step] = []
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()}, {os.cpu_count()} CPUs")
    try:
        capacity = args.capacity
        if capacity is None:
            proc, port, admin = start("on", workdir, args.domain)
            try:
                probe = run_step(args, "on", port, admin, proc.pid, args.probe_rate, 0, workdir)
            finally:
                stop(proc)
                (workdir / "on").rename(workdir / "probe")
            capacity = int(probe.served // 50 * 50)
            print(f"# capacity probe at {args.probe_rate}/s: {probe.served} served/s, "
                  f"{probe.shed} 503/s; capacity taken as {capacity}/s")  # fmt: skip
            time.sleep(args.pause)
        for mode in args.modes.split(","):
            proc, port, admin = start(mode, workdir, args.domain)
            try:
                for i, multiple in enumerate(float(m) for m in args.multiples.split(",")):
                    if i:
                        time.sleep(args.pause)
                    rate = int(capacity * multiple)
                    step = run_step(args, mode, port, admin, proc.pid, rate, multiple, workdir)
                    steps.append(step)
                    print(f"# {mode} {multiple}x ({rate}/s): served {step.served}/s, "
                          f"503 {step.shed}/s, failed {step.failed}", flush=True)  # fmt: skip
            finally:
                stop(proc)
            time.sleep(args.pause)
        print_table(steps)
        if args.json:
            args.json.write_text(json.dumps([asdict(s) for s in steps], indent=2) + "\n")
    finally:
        if args.keep:
            print(f"# logs kept in {workdir}")
        else:
            for path in sorted(workdir.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            workdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())

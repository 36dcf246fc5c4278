"""Drive a registrar with SIPp REGISTERs at increasing rates and report how it copes.

Run by hand from the repository root, never under pytest::

    .venv/bin/python bench/register_rate.py                       # p2psip, UDP
    .venv/bin/python bench/register_rate.py --transport tcp --rates 500,1000 --duration 5
    .venv/bin/python bench/register_rate.py --auth                # digest, MD5 HA1s
    .venv/bin/python bench/register_rate.py --target 127.0.0.1:5070 \
        --target-pid "$(pgrep -d, kamailio)"

Without ``--target`` it starts its own ``p2psip run`` on a free port (in-memory store,
open registration, or a generated users file with ``--auth``) and stops it at the end.
With ``--target HOST:PORT`` it drives whatever registrar listens there, Kamailio for a
side-by-side run; ``--target-pid`` names its processes (comma-separated: Kamailio forks
workers) so that their summed CPU time and RSS can be read from /proc too. The target
must serve ``--domain`` and, with ``--auth``, know the users ``b<rate>u<n>`` (n from
000000) with ``--password``.

Each step sends ``rate x duration`` REGISTERs for distinct users (register.xml, or
register_auth.xml with ``--auth``: a 401 and a second REGISTER each) and reports:

* ok/s: successful registrations over the step's wall time, SIPp's start to its exit.
  A registrar that keeps up gives about the asked rate; one that falls behind stretches
  the step and retransmissions (500 ms, 1 s, ... over UDP) pile on.
* failed: SIPp's FailedCall count (no 200 within --recv-timeout, or a wrong answer).
* proxy CPU: user+system seconds of the registrar during the step, and that over wall
  time (100% is one core); RSS after the step (bindings accumulate across steps, and
  UDP server transactions stay for Timer J, 32 s).
* SIPp CPU: SIPp shares the machine; near 100% it is the bottleneck, not the registrar.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "data" / "sipp"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True, slots=True)
class Step:
    transport: str
    asked_rate: int
    sent: int
    ok: int
    failed: int
    retransmissions: int
    wall_s: float
    ok_per_s: float
    response_ms: float  # SIPp's mean response time (ResponseTime1), for the last 200
    proxy_cpu_s: float | None
    proxy_cpu_pct: float | None
    proxy_rss_mb: float | None
    sipp_cpu_pct: float


# --- the registrar process ---------------------------------------------------------------


def free_port(host: str) -> int:
    """A port free on both UDP and TCP at ``host`` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")


def answers_options(host: str, port: int, timeout: float = 0.2) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        local = sock.getsockname()[1]
        probe = (
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{local};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
            f"From: <sip:bench@{host}>;tag={uuid.uuid4().hex[:8]}\r\n"
            f"To: <sip:{host}:{port}>\r\nCall-ID: {uuid.uuid4().hex}\r\n"
            "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        sock.settimeout(timeout)
        sock.sendto(probe.encode(), (host, port))
        try:
            return sock.recv(65535).startswith(b"SIP/2.0 200")
        except TimeoutError:
            return False


# Runs the CLI with Python's cyclic garbage collector off: a diagnosis, not a way to run
# a site (cyclic garbage is never freed). See "Why UDP collapses" in bench/README.md.
GC_OFF = (
    "import gc, runpy, sys; gc.disable(); sys.argv[0] = 'p2psip'; "
    "runpy.run_module('proxy.cli', run_name='__main__')"
)


def start_p2psip(
    workdir: Path, host: str, domain: str, extra: list[str], *, gc_off: bool = False
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port(host)
    command = [
        sys.executable, *(["-c", GC_OFF] if gc_off else ["-m", "proxy.cli"]), "run",
        "--sip-listen", f"{host}:{port}",
        "--domain", domain,
        "--data-dir", str(workdir / "data"),
        "--admin-listen", f"127.0.0.1:{free_port('127.0.0.1')}",
        "--log-level", "WARNING",
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}
    env["PYTHONPATH"] = str(ROOT)
    log = (workdir / "p2psip.log").open("ab")
    proc = subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"p2psip exited with {proc.returncode}; see {workdir / 'p2psip.log'}")
        if answers_options(host, port):
            return proc, port
    proc.kill()
    raise SystemExit(f"p2psip did not answer OPTIONS; see {workdir / 'p2psip.log'}")


def write_users_file(path: Path, users: list[str], realm: str, password: str) -> None:
    # MD5 HA1s only: p2psip then challenges with MD5 alone, the one algorithm SIPp 3.6 knows.
    with path.open("w") as f:
        for user in users:
            ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
            f.write(f'[users."{user}"]\nha1_md5 = "{ha1}"\n')


def cpu_seconds(pids: list[int]) -> float | None:
    """utime + stime summed over ``pids`` from /proc; None if any cannot be read."""
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total if pids else None


def rss_mb(pids: list[int]) -> float | None:
    """RSS summed over ``pids``; pages shared by forked workers count in each of them."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return None
    return round(total * PAGE_KB / 1024, 1) if pids else None


# --- one SIPp run ------------------------------------------------------------------------


def _seconds(text: str) -> float:
    """SIPp's "HH:MM:SS:uuuuuu" as seconds (0 when missing)."""
    parts = text.split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return 0.0
    h, m, s, us = (int(p) for p in parts)
    return h * 3600 + m * 60 + s + us / 1e6


def run_step(
    args: argparse.Namespace, target: tuple[str, int], pids: list[int], rate: int, workdir: Path
) -> Step:
    total = rate * args.duration
    users = [f"b{rate}u{n:06d}" for n in range(total)]
    name = f"{args.transport}_{rate}"
    inject = workdir / f"{name}_users.csv"
    rows = [f"{u};{args.password}" if args.auth else u for u in users]
    inject.write_text("\n".join(["SEQUENTIAL", *rows]) + "\n")
    stats = workdir / f"{name}_stats.csv"
    sipp_port = free_port(args.local_ip)
    command = [
        args.sipp, f"{target[0]}:{target[1]}",
        "-sf", str(SCENARIOS / ("register_auth.xml" if args.auth else "register.xml")),
        "-t", "t1" if args.transport == "tcp" else "u1",
        "-i", args.local_ip, "-p", str(sipp_port), "-bind_local",
        "-r", str(rate), "-m", str(total), "-inf", str(inject),
        "-key", "domain", args.domain, "-key", "expires", "3600",
        "-key", "contact_params", ";transport=tcp" if args.transport == "tcp" else "",
        "-key", "contact_port", str(sipp_port),
        "-default_behaviors", "all,-bye",
        "-recv_timeout", str(args.recv_timeout * 1000),
        "-timeout", f"{args.duration * 3 + args.recv_timeout + 30}s", "-timeout_error",
        "-nostdin", "-trace_stat", "-stf", str(stats), "-fd", "1",
        "-trace_err", "-error_file", str(workdir / f"{name}_errors.log"),
    ]  # fmt: skip
    if args.auth:
        command += ["-auth_uri", args.domain]
    cpu_before = cpu_seconds(pids)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with (workdir / f"{name}.out").open("wb") as out:
        subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=False)
    wall = time.monotonic() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_after = cpu_seconds(pids)
    rows_read = (
        list(csv.reader(stats.read_text().splitlines(), delimiter=";")) if stats.exists() else []
    )
    last = dict(zip(rows_read[0], rows_read[-1], strict=False)) if len(rows_read) >= 2 else {}

    def count(column: str) -> int:
        value = last.get(column, "")
        return int(value) if value.isdigit() else 0

    ok = count("SuccessfulCall(C)")
    proxy_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    sipp_cpu = (children.ru_utime + children.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    return Step(
        transport=args.transport,
        asked_rate=rate,
        sent=count("TotalCallCreated"),
        ok=ok,
        failed=count("FailedCall(C)"),
        retransmissions=count("Retransmissions(C)"),
        wall_s=round(wall, 2),
        ok_per_s=round(ok / wall, 1),
        response_ms=round(_seconds(last.get("ResponseTime1(C)", "")) * 1000, 2),
        proxy_cpu_s=None if proxy_cpu is None else round(proxy_cpu, 2),
        proxy_cpu_pct=None if proxy_cpu is None else round(100 * proxy_cpu / wall, 1),
        proxy_rss_mb=rss_mb(pids),
        sipp_cpu_pct=round(100 * sipp_cpu / wall, 1),
    )


COLUMNS = {
    "transport": "transport",
    "asked_rate": "asked/s",
    "sent": "sent",
    "ok": "ok",
    "failed": "failed",
    "retransmissions": "retrans",
    "wall_s": "wall s",
    "ok_per_s": "ok/s",
    "response_ms": "resp ms",
    "proxy_cpu_s": "proxy CPU s",
    "proxy_cpu_pct": "proxy CPU %",
    "proxy_rss_mb": "proxy RSS MB",
    "sipp_cpu_pct": "SIPp CPU %",
}


def print_table(steps: list[Step]) -> None:
    """The steps as a Markdown table, ready for bench/README.md."""
    print("| " + " | ".join(COLUMNS.values()) + " |")
    print("|" + "---|" * len(COLUMNS))
    for step in steps:
        cells = [getattr(step, name) for name in COLUMNS]
        print("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates", default="500,1000,2000,4000", help="REGISTER/s per step, comma-separated"
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per step")
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    parser.add_argument(
        "--auth", action="store_true", help="digest: 401 then an authorized REGISTER"
    )
    parser.add_argument("--password", default="secret", help="every user's password (--auth)")
    parser.add_argument("--domain", default="p2psip.test", help="SIP domain the registrar serves")
    parser.add_argument(
        "--target", metavar="HOST:PORT", help="an already running registrar (e.g. Kamailio)"
    )
    parser.add_argument(
        "--target-pid", default="", help="its process ids, comma-separated, for CPU and RSS"
    )
    parser.add_argument(
        "--local-ip", default="127.0.0.1", help="SIPp's address (reachable by the target)"
    )
    parser.add_argument(
        "--recv-timeout", type=int, default=10, help="seconds a REGISTER may wait for its 200"
    )
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between steps")
    parser.add_argument(
        "--p2psip-arg", action="append", default=[], help="extra flag for p2psip run (repeatable)"
    )
    parser.add_argument("--sipp", default="sipp", help="SIPp binary")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (SIPp logs)")
    parser.add_argument(
        "--gc-off", action="store_true", help="diagnosis: run p2psip with gc.disable()"
    )
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",") if r]

    workdir = Path(tempfile.mkdtemp(prefix="p2psip-bench-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        if args.target:
            host, _, port_text = args.target.rpartition(":")
            target = (host, int(port_text))
            pids = [int(p) for p in args.target_pid.split(",") if p]
            label = f"target {args.target}" + (f" (pids {args.target_pid})" if pids else "")
        else:
            extra = list(args.p2psip_arg)
            if args.auth:
                users = [f"b{rate}u{n:06d}" for rate in rates for n in range(rate * args.duration)]
                users_file = workdir / "users.toml"
                write_users_file(users_file, users, args.domain, args.password)
                extra += ["--users", str(users_file)]
            proc, port = start_p2psip(
                workdir, args.local_ip, args.domain, extra, gc_off=args.gc_off
            )
            target, pids = (args.local_ip, port), [proc.pid]
            label = f"p2psip (pid {proc.pid}) on {args.local_ip}:{port}"
            label += ", cyclic GC off" if args.gc_off else ""
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()}, {os.cpu_count()} CPUs, {label}"
        )
        mode = f"{args.transport}{', digest auth' if args.auth else ''}"
        rss = rss_mb(pids)
        print(f"# {mode}, {args.duration}s per step; RSS before: {rss or '-'} MB")
        steps = []
        for i, rate in enumerate(rates):
            if i:
                time.sleep(args.pause)
            step = run_step(args, target, pids, rate, workdir)
            steps.append(step)
            print(f"# {rate}/s: ok {step.ok}/{step.sent}, failed {step.failed}", flush=True)
        print_table(steps)
        if args.json:
            args.json.write_text(json.dumps([asdict(s) for s in steps], indent=2) + "\n")
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
        if args.keep:
            print(f"# logs kept in {workdir}")
        else:
            for path in sorted(workdir.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            workdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())

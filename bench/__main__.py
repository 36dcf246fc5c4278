"""p2psip side by side with Kamailio, in one command.

    python -m bench                      # everything: about an hour and a half on 2 cores
    python -m bench --quick --out /tmp/b # seconds: one short step per scenario (CI's smoke)
    python -m bench --servers p2psip,kamailio --scenarios register,call
    python -m bench --report-only docs/benchmarks.json   # tables and plots again, no run

One after the other on this host, with the same SIPp scenarios: p2psip (one process,
memory store), p2psip with Redis and a standalone DHT node, p2psip with worker
processes (once it has them), and Kamailio (bench/kamailio.cfg). For each server and
scenario: the highest rate sustained for ``--duration`` seconds with under 0.1% failures,
CPU per request, response times, the rate served at 2x and 4x that, and the memory of
100,000 bindings. Writes OUT/benchmarks.md, OUT/benchmarks.json and OUT/img/*.png.
bench/README.md says where each figure comes from.

Missing tools get one line naming the command that installs them, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .machine import ROOT, MissingTool, find_tool, loadavg, machine_info
from .report import write_report
from .search import Outcome, measure
from .servers import P2PSIP_TUNING, StartError, setups, workers_available
from .steps import SCENARIOS, Context, Memory, StepError, measure_memory, run_step

APPLIES = {"kamailio": ("register", "call", "register-auth")}


class Progress:
    """One line on stderr, rewritten in place on a terminal, else a line per change."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.prefix = ""
        self._last = ""

    def __call__(self, text: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        line = f"[{minutes:3d}:{seconds:02d}] {self.prefix}: {text}"
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            sys.stderr.write("\r" + line[:width].ljust(width))
        elif text.split(",")[0] != self._last:
            sys.stderr.write(line + "\n")
        self._last = text.split(",")[0]
        sys.stderr.flush()

    def done(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r")
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        sys.stderr.write(f"[{minutes:3d}:{seconds:02d}] {self.prefix}: {text}\n")
        sys.stderr.flush()
        self._last = ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="default: docs/")
    p.add_argument("--quick", action="store_true", help="one short step per scenario, tiny counts")
    p.add_argument(
        "--servers",
        default="p2psip,p2psip-redis,p2psip-workers,kamailio",
        help="comma-separated, in this order (default: all four)",
    )
    p.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated (default: all four)"
    )
    p.add_argument("--duration", type=float, help="seconds per step (20; --quick: 2)")
    p.add_argument(
        "--start-rate", type=int, help="first rate of every search (default: per scenario)"
    )
    p.add_argument("--max-rate", type=int, default=20000, help="the search stops here")
    p.add_argument("--precision", type=float, default=0.1, help="bisect to within this (0.1)")
    p.add_argument("--max-failures", type=float, default=0.001, help="sustained: under this share")
    p.add_argument("--recv-timeout", type=float, default=10.0, help="seconds for a final answer")
    p.add_argument("--tail", type=float, help="seconds of deferred CPU read (35; --quick: 0)")
    p.add_argument("--memory-bindings", type=int, help="100000 (--quick: 200; 0: skip)")
    p.add_argument("--callee-pool", type=int, default=20000, help="call-sites: distinct callees")
    p.add_argument("--setup-rate", type=float, default=200.0, help="callee REGISTERs/s")
    p.add_argument("--quick-rate", type=int, default=20, help="--quick: calls/s of its one step")
    p.add_argument("--host", default="127.0.0.1", help="the server's and SIPp's address")
    p.add_argument("--site-hosts", default="127.0.0.21,127.0.0.22", help="call-sites: two")
    p.add_argument("--no-plots", action="store_true", help="no PNGs (no matplotlib needed)")
    p.add_argument("--note", default="", help="a paragraph for the top of benchmarks.md")
    p.add_argument(
        "--analysis",
        type=Path,
        metavar="MD",
        help="with --report-only: markdown on where the time goes, after the targets",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (SIPp logs)")
    p.add_argument("--report-only", type=Path, metavar="JSON", help="rewrite from a results file")
    return p  # fmt: skip


def _tools(servers: list[str], plots: bool, all_setups: dict[str, Any]) -> dict[str, str]:
    needed = {"sipp"} | {t for s in servers for t in all_setups[s].tools}
    if plots:
        needed.add("matplotlib")
    found, missing = {}, []
    for name in sorted(needed):
        try:
            found[name] = find_tool(name)
        except MissingTool as exc:
            missing.append(str(exc))
    if missing:
        raise MissingTool("; ".join(missing))
    return found


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that every server and SIPp started is stopped on the way out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    cores = os.cpu_count() or 1
    all_setups = setups(cores)
    if args.report_only:
        results: dict[str, Any] = json.loads(args.report_only.read_text())
        if args.note:
            results["note"] = args.note
        if args.analysis:
            results["analysis"] = args.analysis.read_text()
        write_report(results, args.out, plots=not args.no_plots)
        return 0
    servers = [s for s in args.servers.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in servers if s not in all_setups] + [
        s for s in scenarios if s not in SCENARIOS
    ]
    if unknown:
        print(f"bench: unknown server or scenario: {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        tools = _tools(servers, not args.no_plots, all_setups)
    except MissingTool as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    quick = args.quick
    duration = args.duration or (2.0 if quick else 20.0)
    tail = args.tail if args.tail is not None else (0.0 if quick else 35.0)
    bindings = args.memory_bindings if args.memory_bindings is not None else (
        200 if quick else 100_000)  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="p2psip-bench-"))
    progress = Progress()
    hosts = tuple(args.site_hosts.split(","))
    ctx = Context(
        tools=tools, workdir=workdir, duration=duration, recv_timeout=args.recv_timeout,
        max_failures=args.max_failures, tail_s=tail, setup_rate=args.setup_rate,
        callee_pool=args.callee_pool, host=args.host, site_hosts=(hosts[0], hosts[-1]),
        progress=progress,
    )  # fmt: skip
    results = {
        "version": 1,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "quick": quick,
        "note": args.note,
        "machine": machine_info(tools),
        "settings": {
            "duration_s": duration, "precision": args.precision,
            "max_failures": args.max_failures, "recv_timeout_s": args.recv_timeout,
            "tail_s": tail, "memory_bindings": bindings, "callee_pool": args.callee_pool,
            "p2psip_environment": P2PSIP_TUNING, "host": args.host,
            "site_hosts": list(ctx.site_hosts),
        },
        "loadavg": [loadavg()],
        "servers": {k: {"title": all_setups[k].title} for k in servers},
        "scenarios": {k: {"title": SCENARIOS[k].title, "unit": SCENARIOS[k].unit}
                      for k in scenarios},
        "outcomes": [],
        "memory": [],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "benchmarks.json"

    def save() -> None:
        results["loadavg"].append(loadavg())
        raw.write_text(json.dumps(results, indent=1) + "\n")

    try:
        for key in servers:
            setup = all_setups[key]
            if setup.workers and not workers_available():
                results["servers"][key]["note"] = "not available: p2psip run has no --workers yet"
                for scenario in scenarios:
                    results["outcomes"].append(
                        Outcome(key, scenario, "not available", "no --workers yet").to_json()
                    )
                continue
            for name in scenarios:
                scenario = SCENARIOS[name]
                outcome = Outcome(key, name)
                progress.prefix = f"{key} / {name}"
                if name not in APPLIES.get(key, tuple(SCENARIOS)):
                    outcome.status = "does not apply"
                    outcome.note = "one server, no DHT"
                    results["outcomes"].append(outcome.to_json())
                    continue

                def run(rate: int, phase: str, setup: Any = setup, scenario: Any = scenario) -> Any:
                    step = run_step(ctx, setup, scenario, rate, phase)
                    progress.done(
                        f"{phase} {rate}/s: served {step.served}/{step.sent} "
                        f"({step.served_per_s:g}/s), 503 {step.shed}, failed "
                        f"{step.failed + step.unfinished}, CPU {step.server_cpu_pct:g}%"
                        f"{', sustained' if step.sustained else ''}"
                    )
                    return step

                try:
                    if quick:
                        outcome.steps.append(run(args.quick_rate, "quick"))
                        outcome.sustained = args.quick_rate if outcome.steps[0].sustained else None
                    else:
                        start = args.start_rate or scenario.start_rate
                        measure(run, outcome, start, max_rate=args.max_rate,
                                precision=args.precision)  # fmt: skip
                except (StartError, StepError) as exc:
                    outcome.status = "error"
                    outcome.note = str(exc).splitlines()[0]
                    progress.done(f"error: {exc}")
                results["outcomes"].append(outcome.to_json())
                save()
                if name == "register" and bindings:
                    rate = max(50, (outcome.sustained or 100) // 2)
                    progress.prefix = f"{key} / memory"
                    try:
                        memory: Memory = measure_memory(
                            ctx, setup, bindings, args.quick_rate * 5 if quick else rate,
                            1.0 if quick else 35.0,
                        )  # fmt: skip
                        results["memory"].append(memory.to_json())
                        progress.done(f"{memory.per_100k_mb} MB per 100,000 bindings")
                    except (StartError, StepError) as exc:
                        progress.done(f"error: {exc}")
                    save()
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        save()
        write_report(results, args.out, plots=not args.no_plots)
        progress.prefix = "bench"
        progress.done(f"wrote {args.out / 'benchmarks.md'} and {raw}")
    finally:
        if args.keep:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Every server and SIPp started was stopped on the way out; what finished is saved.
        print(
            "bench: interrupted; the scenarios that finished are in benchmarks.json "
            "(python -m bench --report-only FILE writes their report)",
            file=sys.stderr,
        )
        sys.exit(130)

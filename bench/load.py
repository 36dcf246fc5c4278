"""SIPp as the load: one run, and what it saw.

Every load run is open loop (``-l`` far above anything reached): SIPp starts calls at
the asked rate whatever the answers, as phones would, for ``duration`` seconds
(``-m rate x duration``). The scenarios end a call on a 503 as well as on the final 200
(``bench/register_503.xml``, ``bench/scenarios/*_503.xml``), so three outcomes are told
apart: served (the final 200), shed (503, counted from ``-trace_counts``) and failed (no
final answer within ``--recv-timeout``, or a wrong one: SIPp's FailedCall).

Figures, all from SIPp's own files:

* served/s: final 200s per second while SIPp was sending, from its first second to its
  last (``-trace_counts`` rows, one a second); a server that falls behind serves less
  than asked there, even if every request is answered in the end;
* p50/p99: response times from ``-trace_rtt`` (every call's, 1 ms resolution): from the
  first request to the final 200 (a REGISTER's 200; both transactions with digest; the
  INVITE's 200 for calls);
* SIPp's own CPU time (``wait4``), so a table can show when the load generator, not the
  server, was the limit.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .machine import ROOT, cpu_seconds, free_port

BENCH = Path(__file__).resolve().parent
REGISTER = BENCH / "register_503.xml"
REGISTER_AUTH = BENCH / "scenarios" / "register_auth_503.xml"
UAC = BENCH / "scenarios" / "uac_503.xml"
UAS = ROOT / "tests" / "data" / "sipp" / "uas.xml"
OPEN_LOOP = "1000000"  # -l: concurrent calls SIPp may have open


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one SIPp run saw."""

    exit_code: int
    sent: int
    served: int  # calls that ended with the final 200
    shed: int  # calls that ended with a 503
    failed: int  # no final answer in time, or a wrong one
    retransmissions: int
    wall_s: float
    served_per_s: float  # while sending
    shed_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    sipp_cpu_s: float


def _elapsed(text: str) -> float:
    """SIPp's "HH:MM:SS:uuuuuu" (or "HH:MM:SS") as seconds; 0 when unreadable."""
    parts = text.strip().split(":")
    try:
        h, m, s = (int(p) for p in parts[:3])
        us = int(parts[3]) if len(parts) > 3 else 0
    except ValueError:
        return 0.0
    return h * 3600 + m * 60 + s + us / 1e6


def _rows(path: Path | None) -> list[dict[str, str]]:
    if path is None or not path.exists():
        return []
    rows = list(csv.reader(path.read_text(errors="replace").splitlines(), delimiter=";"))
    return [dict(zip(rows[0], row, strict=False)) for row in rows[1:] if row]


def _int(row: dict[str, str], column: str) -> int:
    value = row.get(column, "").strip()
    return int(value) if value.isdigit() else 0


def _one(directory: Path, pattern: str) -> Path | None:
    found = sorted(directory.glob(pattern))
    return found[-1] if found else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by the nearest-rank method; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def window_rates(counts: list[dict[str, str]], start_s: float, end_s: float) -> tuple[float, float]:
    """(final 200s, 503s) per second between the rows nearest to start_s and end_s."""
    if not counts:
        return 0.0, 0.0
    columns = list(counts[0])
    final = [c for c in columns if c.endswith("_200_Recv")][-1:]
    shed = [c for c in columns if c.endswith("_503_Recv")]
    timed = [(_elapsed(r.get("ElapsedTime", "")), r) for r in counts]
    inside = [(t, r) for t, r in timed if start_s - 0.01 <= t <= end_s + 0.6]
    if len(inside) < 2:
        inside = timed[:1] + timed[-1:]
    (t0, a), (t1, b) = inside[0], inside[-1]
    if t1 <= t0:
        return 0.0, 0.0
    served = sum(_int(b, c) - _int(a, c) for c in final) / (t1 - t0)
    shed_rate = sum(_int(b, c) - _int(a, c) for c in shed) / (t1 - t0)
    return served, shed_rate


class Sipp:
    """One SIPp process writing its files into ``directory``."""

    def __init__(
        self, binary: str, directory: Path, name: str, args: Sequence[str], *,
        timeout_s: float, port: int | None = None,
    ) -> None:  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port
        self.name = name
        self.stats = directory / f"{name}_stats.csv"
        self.timeout_s = timeout_s
        argv = [
            binary, *args, "-nostdin", "-trace_stat", "-stf", str(self.stats), "-fd", "1",
            "-trace_err", "-error_file", str(directory / f"{name}_errors.log"),
            "-timeout", f"{int(timeout_s)}s", "-timeout_error",
        ]  # fmt: skip
        self.argv = argv
        self._out = (directory / f"{name}.out").open("wb")
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out,
            cwd=directory, start_new_session=True,
        )  # fmt: skip
        self.started = time.monotonic()
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def wait(self, tick: Callable[[float], None] | None = None) -> int:
        """Wait for SIPp to exit (killed after its own -timeout plus 15 s), calling
        ``tick(elapsed)`` about once a second; its CPU time comes from wait4."""
        deadline = self.started + self.timeout_s + 15
        try:
            while True:
                pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
                if pid:
                    break
                now = time.monotonic()
                if now > deadline:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                if tick is not None:
                    tick(now - self.started)
                time.sleep(0.2 if tick is None else 1.0)
        except BaseException:  # interrupted: SIPp runs in its own session, take it along
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
            raise
        self.wall_s = time.monotonic() - self.started
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        self._out.close()
        return self.popen.returncode

    def stop(self) -> int:
        """Ask a UAS to finish (SIGUSR1) and wait; its CPU time is read before it goes."""
        if self.popen.poll() is None:
            self.cpu_s = cpu_seconds([self.popen.pid])
            self.popen.send_signal(signal.SIGUSR1)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._out.close()
        return self.popen.returncode

    def last_stats(self) -> dict[str, str]:
        rows = _rows(self.stats)
        return rows[-1] if rows else {}

    def wait_ready(self, timeout: float = 10.0) -> None:
        """A UAS listens once its first statistics row is written."""
        deadline = time.monotonic() + timeout
        while len(_rows(self.stats)) < 1:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SIPp {self.name} did not start: {self.argv}")
            time.sleep(0.05)


def write_inject(path: Path, rows: Sequence[str]) -> Path:
    path.write_text("\n".join(["SEQUENTIAL", *rows]) + "\n")
    return path


def client_args(
    scenario: Path, target: tuple[str, int], local_ip: str, port: int, rate: float,
    calls: int, inject: Path, recv_timeout_s: float,
) -> list[str]:  # fmt: skip
    return [
        f"{target[0]}:{target[1]}", "-sf", str(scenario), "-t", "u1",
        "-i", local_ip, "-p", str(port), "-bind_local",
        "-r", f"{rate:g}", "-m", str(calls), "-l", OPEN_LOOP, "-inf", str(inject),
        "-key", "domain", "p2psip.test", "-key", "expires", "3600",
        "-key", "contact_port", str(port), "-key", "contact_params", "",
        "-key", "caller", "caller",
        "-recv_timeout", str(int(recv_timeout_s * 1000)),
        "-trace_counts", "-trace_rtt", "-rtt_freq", str(_rtt_freq(calls)),
    ]  # fmt: skip


def _rtt_freq(calls: int) -> int:
    """SIPp writes response times in batches of -rtt_freq and drops a partial last batch:
    the largest batch up to 200 that divides the number of calls loses none."""
    return next(f for f in range(min(200, calls), 0, -1) if calls % f == 0)


def run_load(
    binary: str, directory: Path, name: str, scenario: Path, target: tuple[str, int],
    local_ip: str, rate: float, duration: float, inject: Path, *, recv_timeout_s: float,
    extra: Sequence[str] = (), tick: Callable[[float], None] | None = None,
    contact_port: int | None = None,
) -> LoadResult:  # fmt: skip
    """``rate`` calls a second for ``duration`` seconds from ``local_ip``; wait for the end.
    REGISTERs bind SIPp's own port, or ``contact_port`` (a callee SIPp's)."""
    calls = max(1, round(rate * duration))
    port = free_port(local_ip)
    args = client_args(scenario, target, local_ip, port, rate, calls, inject, recv_timeout_s)
    if contact_port is not None:
        args[args.index("contact_port") + 1] = str(contact_port)
    sipp = Sipp(binary, directory, name, [*args, *extra],
                timeout_s=duration * 3 + recv_timeout_s + 30)  # fmt: skip
    code = sipp.wait(tick)
    stats = sipp.last_stats()
    counts = _rows(_one(directory, "*_counts.csv"))
    rtts: list[float] = []
    for row in _rows(_one(directory, "*_rtt.csv")):
        try:
            rtts.append(float(row.get("response_time_ms", "")))
        except ValueError:
            continue
    shed = sum(_int(counts[-1], c) for c in counts[-1] if c.endswith("_503_Recv")) if counts else 0
    successful = _int(stats, "SuccessfulCall(C)")
    window = (1.0, duration) if duration >= 3 else (0.0, duration + 1.0)
    served_rate, shed_rate = window_rates(counts, *window)
    return LoadResult(
        exit_code=code,
        sent=_int(stats, "TotalCallCreated"),
        served=successful - shed,
        shed=shed,
        failed=_int(stats, "FailedCall(C)"),
        retransmissions=_int(stats, "Retransmissions(C)"),
        wall_s=round(sipp.wall_s, 2),
        served_per_s=round(served_rate, 1),
        shed_per_s=round(shed_rate, 1),
        p50_ms=percentile(rtts, 0.50),
        p99_ms=percentile(rtts, 0.99),
        sipp_cpu_s=sipp.cpu_s,
    )


def start_uas(binary: str, directory: Path, host: str) -> Sipp:
    """A SIPp callee (tests/data/sipp/uas.xml) on a free port of ``host``, listening."""
    port = free_port(host)
    uas = Sipp(binary, directory, "uas", [
        "-sf", str(UAS), "-t", "u1", "-i", host, "-p", str(port), "-bind_local",
        "-key", "contact_params", "",
    ], timeout_s=24 * 3600, port=port)  # fmt: skip
    uas.wait_ready()
    return uas


def register_contacts(
    binary: str, directory: Path, target: tuple[str, int], local_ip: str,
    users: Sequence[str], contact_port: int, rate: float,
) -> LoadResult:  # fmt: skip
    """Bind each of ``users`` to sip:user@local_ip:contact_port (a callee SIPp)."""
    inject = write_inject(directory / "callees.csv", users)
    return run_load(
        binary, directory / "callees", "register_callees", REGISTER, target, local_ip, rate,
        len(users) / rate, inject, recv_timeout_s=10.0, contact_port=contact_port,
        extra=["-default_behaviors", "all,-bye"],
    )  # fmt: skip

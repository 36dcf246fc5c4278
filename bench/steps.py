"""One step of the benchmark: start a server fresh, load it with SIPp at one rate for
``duration`` seconds, read what it cost, stop it. And the memory measurement.

The four scenarios:

* ``register``: REGISTERs of distinct users (``u000000``...), one each.
* ``call``: full calls (INVITE/100/180/200/ACK/BYE/200) from a SIPp UAC through the
  server to a SIPp UAS registered first as ``callee``; ACK and BYE follow the
  Record-Route.
* ``register-auth``: REGISTER, 401, the authorized REGISTER, 200, for distinct users
  the server knows (a users file of MD5 HA1s for p2psip, an htable for Kamailio).
* ``call-sites``: calls to users registered at another p2psip site: two sites on two
  loopback addresses, one overlay; the callees (``c000000``..., one per call up to
  ``--callee-pool``, all bound to one SIPp UAS) register at the first site and the calls
  enter at the second, which finds each callee through a DHT lookup (its cache holds
  nothing yet: every callee is called once) and relays to the first.

CPU time is the server's (every process of it, both sites in ``call-sites``) from
SIPp's start to its exit. Work a server defers past that (p2psip keeps completed UDP
transactions for Timer J, 32 s, RFC 3261 §17.2.2) is measured separately on the
confirmation step: the CPU spent in the ``tail`` seconds after the load stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .load import (
    REGISTER,
    REGISTER_AUTH,
    UAC,
    register_contacts,
    run_load,
    start_uas,
    write_inject,
)
from .machine import MachineCpu, cpu_seconds, loadavg, memory_mb
from .servers import DOMAIN, PASSWORD, Server, Setup, start, start_two_sites


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    unit: str  # what one SIPp call is, for "CPU per ..."
    start_rate: int  # the search's first step, per second


SCENARIOS = {s.key: s for s in (
    Scenario("register", "REGISTER of distinct users", "REGISTER", 200),
    Scenario("call", "calls through the proxy to a registered UAS", "call", 50),
    Scenario("register-auth", "REGISTER with digest (401, then the authorized retry)",
             "registration", 100),
    Scenario("call-sites", "calls to a user at another site, through the DHT", "call", 25),
)}  # fmt: skip

# Counters of p2psip's /stats kept with each step (summed over sites).
KEPT_STATS = ("dht_lookups", "dht_cache_hits", "dht_cache_misses", "calls_routed_dht",
              "overload_rejected", "registers_ok", "dht_backlog")  # fmt: skip


@dataclass
class Context:
    tools: dict[str, str]
    workdir: Path
    duration: float
    recv_timeout: float
    max_failures: float  # the fraction of calls that may fail in a sustained step
    tail_s: float
    setup_rate: float  # REGISTERs/s for the callees of the call scenarios
    callee_pool: int
    host: str
    site_hosts: tuple[str, str]
    progress: Callable[[str], None]
    counter: int = 0


@dataclass(frozen=True, slots=True)
class Step:
    server: str
    scenario: str
    phase: str  # search, confirm, 2x, 4x, quick
    asked: int  # per second
    duration: float
    sent: int
    served: int
    shed: int
    failed: int
    unfinished: int
    retransmissions: int
    wall_s: float
    served_per_s: float
    shed_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    server_cpu_s: float
    server_cpu_pct: float  # of one core, over the step
    cpu_us: float | None  # per served request
    deferred_cpu_s: float | None
    sipp_cpu_pct: float  # the load generators (UAC and UAS), of one core
    others_cores: float  # everything else on the machine, in cores
    loadavg: float
    sustained: bool
    note: str = ""
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.failed + self.shed + self.unfinished

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class StepError(RuntimeError):
    """The step could not be measured (a server did not start, a callee not register)."""


def _wait_backlog(server: Server, timeout: float = 60.0) -> None:
    """Until the site's DHT adaptor has written every binding (dht_backlog 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.stats().get("dht_backlog", 1) == 0:
            return
        time.sleep(0.2)


def run_step(ctx: Context, setup: Setup, scenario: Scenario, rate: int, phase: str) -> Step:
    ctx.counter += 1
    d = ctx.workdir / setup.key / scenario.key / f"{ctx.counter:03d}_{phase}_{rate}"
    sipp = ctx.tools["sipp"]
    total = max(1, round(rate * ctx.duration))
    servers: list[Server] = []
    uas = None
    note = ""
    try:
        extra: list[str] = []
        if scenario.key in ("register", "register-auth"):
            auth = scenario.key == "register-auth"
            users = [f"u{n:06d}" for n in range(total)]
            servers.append(start(setup, d / "server", ctx.host, users=users if auth else None,
                                 tools=ctx.tools))  # fmt: skip
            inject = write_inject(d / "users.csv", [f"{u};{PASSWORD}" if auth else u
                                                    for u in users])  # fmt: skip
            sipp_scenario = REGISTER_AUTH if auth else REGISTER
            extra = ["-default_behaviors", "all,-bye", *(["-auth_uri", DOMAIN] if auth else [])]
            target, local_ip = servers[0].sip, ctx.host
        elif scenario.key == "call":
            servers.append(start(setup, d / "server", ctx.host, users=None, tools=ctx.tools))
            uas = start_uas(sipp, d / "uas", ctx.host)
            reg = register_contacts(sipp, d, servers[0].sip, ctx.host, ["callee"],
                                    uas.port or 0, 10)  # fmt: skip
            if reg.served != 1:
                raise StepError("the callee's REGISTER failed")
            inject = write_inject(d / "calls.csv", ["callee"])
            sipp_scenario, target, local_ip = UAC, servers[0].sip, ctx.host
        else:  # call-sites
            home, caller = start_two_sites(setup, d, ctx.site_hosts, ctx.tools)
            servers += [home, caller]
            uas = start_uas(sipp, d / "uas", home.host)
            pool = [f"c{n:06d}" for n in range(min(total, ctx.callee_pool))]
            ctx.progress(f"registering {len(pool)} callees at {ctx.setup_rate:g}/s")
            reg = register_contacts(sipp, d, home.sip, home.host, pool, uas.port or 0,
                                    ctx.setup_rate)  # fmt: skip
            if reg.served < len(pool):
                note = f"{len(pool) - reg.served} of {len(pool)} callees did not register; "
            _wait_backlog(home)
            inject = write_inject(d / "calls.csv", pool)
            sipp_scenario, target, local_ip = UAC, caller.sip, caller.host
        pids = [pid for s in servers for pid in s.pids()]
        uas_pids = [uas.popen.pid] if uas is not None else []
        cpu0, uas0, machine0 = cpu_seconds(pids), cpu_seconds(uas_pids), MachineCpu.now()

        def tick(elapsed: float) -> None:
            ctx.progress(f"{rate}/s, {elapsed:.0f}/{ctx.duration:g} s")

        result = run_load(
            sipp, d / "uac", "uac", sipp_scenario, target, local_ip, rate, ctx.duration,
            inject, recv_timeout_s=ctx.recv_timeout, extra=extra, tick=tick,
        )  # fmt: skip
        cpu1, uas1, machine1 = cpu_seconds(pids), cpu_seconds(uas_pids), MachineCpu.now()
        deferred = None
        if phase == "confirm" and ctx.tail_s > 0:
            ctx.progress(f"{rate}/s done; {ctx.tail_s:g} s for the deferred work")
            time.sleep(ctx.tail_s)
            deferred = round(cpu_seconds(pids) - cpu1, 3)
        stats: dict[str, float] = {}
        for server in servers:
            for key, value in server.stats().items():
                if key in KEPT_STATS:
                    stats[key] = stats.get(key, 0) + value
    finally:
        if uas is not None:
            uas.stop()
        for server in servers:
            server.stop()
    server_cpu = cpu1 - cpu0
    sipp_cpu = result.sipp_cpu_s + (uas1 - uas0)
    wall = max(result.wall_s, 0.001)
    others = (machine1.busy - machine0.busy) - server_cpu - sipp_cpu
    unfinished = max(0, total - result.served - result.shed - result.failed)
    errors = result.failed + result.shed + unfinished
    keeps_up = ctx.duration < 3 or result.served_per_s >= 0.95 * rate
    sustained = errors <= ctx.max_failures * total and keeps_up
    if not keeps_up and errors <= ctx.max_failures * total:
        note += f"answered all, but served only {result.served_per_s:g}/s while sending; "
    return Step(
        server=setup.key, scenario=scenario.key, phase=phase, asked=rate,
        duration=ctx.duration, sent=result.sent, served=result.served, shed=result.shed,
        failed=result.failed, unfinished=unfinished, retransmissions=result.retransmissions,
        wall_s=result.wall_s, served_per_s=result.served_per_s, shed_per_s=result.shed_per_s,
        p50_ms=result.p50_ms, p99_ms=result.p99_ms, server_cpu_s=round(server_cpu, 3),
        server_cpu_pct=round(100 * server_cpu / wall, 1),
        cpu_us=round(1e6 * server_cpu / result.served, 1) if result.served else None,
        deferred_cpu_s=deferred, sipp_cpu_pct=round(100 * sipp_cpu / wall, 1),
        others_cores=round(max(0.0, others) / wall, 2), loadavg=loadavg(),
        sustained=sustained, note=note.strip("; "), stats=stats,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Memory:
    server: str
    bindings: int  # REGISTERs answered 200
    asked: int
    rate: int
    before_mb: float
    after_mb: float
    per_100k_mb: float | None
    cpu_us: float | None  # per REGISTER, over the whole run
    failed: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_memory(ctx: Context, setup: Setup, count: int, rate: int, settle_s: float) -> Memory:
    """Register ``count`` users at ``rate``; the memory of all the server's processes
    before and ``settle_s`` after (once UDP transactions are gone: Timer J is 32 s)."""
    ctx.counter += 1
    d = ctx.workdir / setup.key / "memory" / f"{ctx.counter:03d}_{count}"
    server = start(setup, d / "server", ctx.host, users=None, tools=ctx.tools)
    try:
        time.sleep(2.0)  # start-up work (DHT join, first stats) out of the way
        pids = server.pids()
        before, cpu0 = memory_mb(pids), cpu_seconds(pids)
        inject = write_inject(d / "users.csv", [f"m{n:07d}" for n in range(count)])

        def tick(elapsed: float) -> None:
            ctx.progress(f"{count} bindings at {rate}/s, {elapsed:.0f}/{count / rate:.0f} s")

        result = run_load(
            ctx.tools["sipp"], d / "uac", "memory", REGISTER, server.sip, ctx.host, rate,
            count / rate, inject, recv_timeout_s=ctx.recv_timeout,
            extra=["-default_behaviors", "all,-bye"], tick=tick,
        )  # fmt: skip
        cpu = cpu_seconds(pids) - cpu0
        ctx.progress(f"{result.served} bindings; {settle_s:g} s before reading memory")
        time.sleep(settle_s)
        after = memory_mb(pids)
    finally:
        server.stop()
    served = result.served
    return Memory(
        server=setup.key, bindings=served, asked=count, rate=rate, before_mb=before,
        after_mb=after,
        per_100k_mb=round((after - before) * 100_000 / served, 1) if served else None,
        cpu_us=round(1e6 * cpu / served, 1) if served else None,
        failed=result.failed + result.shed,
    )  # fmt: skip

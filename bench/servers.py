"""The servers under test, each started fresh (new port, empty location table) for every
step of the benchmark and stopped after it, so that no step inherits another's bindings,
transactions or garbage.

* ``p2psip``: one ``p2psip run`` process, memory store (its DHT adaptor writes every
  binding to its own node: a one-site overlay).
* ``p2psip-redis``: a site as docker-compose.yml runs it: a redis-server, a standalone
  ``p2psip dht`` node storing into it, and ``p2psip run --redis-url`` whose DHT node
  bootstraps from that node. CPU and memory are summed over the three.
* ``p2psip-workers``: ``p2psip-redis`` with ``--workers N`` (N = the cores), available
  once ``p2psip run --help`` offers ``--workers``; until then its rows say "not available".
* ``kamailio``: Kamailio with bench/kamailio.cfg (one UDP worker, usrloc in memory).

Every p2psip here runs with ``P2PSIP_FLOOD_MAX_REQUESTS`` out of reach (SIPp sends all
its users' traffic from one address, which the flood guard would block as any single
source sending hundreds of requests a second; the check itself still runs) and
``P2PSIP_NAT_KEEPALIVE_INTERVAL=0`` (no OPTIONS to every UDP binding every 30 s: SIPp's
ports are gone after each run, and Kamailio's minimal config has no nathelper either).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .machine import ROOT, answers_options, free_port, process_tree

DOMAIN = "p2psip.test"
PASSWORD = "secret"
ADMIN_TOKEN = "bench-admin-token"
KAMAILIO_CFG = Path(__file__).resolve().parent / "kamailio.cfg"
START_TIMEOUT = 60.0  # seconds; generous, for a loaded machine
P2PSIP_TUNING = {
    "P2PSIP_FLOOD_MAX_REQUESTS": "1000000000",
    "P2PSIP_NAT_KEEPALIVE_INTERVAL": "0",
    "P2PSIP_SHUTDOWN_GRACE": "1",
}


log = logging.getLogger(__name__)


class StartError(RuntimeError):
    """A server did not come up; the message ends with the tail of its log."""


@dataclass(frozen=True, slots=True)
class Setup:
    """One of the servers the benchmark compares."""

    key: str
    title: str
    tools: tuple[str, ...]
    redis: bool = False
    workers: int | None = None

    @property
    def is_p2psip(self) -> bool:
        return self.key.startswith("p2psip")


def setups(cores: int) -> dict[str, Setup]:
    return {s.key: s for s in (
        Setup("p2psip", "p2psip, one process, memory store", ("sipp",)),
        Setup("p2psip-redis", "p2psip with Redis and a standalone DHT node",
              ("sipp", "redis-server"), redis=True),
        Setup("p2psip-workers", f"p2psip with {cores} worker processes (Redis)",
              ("sipp", "redis-server"), redis=True, workers=cores),
        Setup("kamailio", "Kamailio 5.6, one worker, usrloc in memory", ("sipp", "kamailio")),
    )}  # fmt: skip


def workers_available() -> bool:
    """Whether this p2psip has a multi-worker mode (``p2psip run --workers N``)."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "run", "--help"],
        capture_output=True, text=True, cwd=ROOT, env=_env({}), timeout=60, check=False,
    )  # fmt: skip
    return "--workers" in out.stdout


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra}


class Proc:
    """A process started in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)

    def check(self, what: str) -> None:
        if not self.alive():
            status = self.popen.returncode
            raise StartError(f"{self.name} exited {status} ({what}); its log:\n{self.tail()}")


@dataclass
class Server:
    """A running system under test: where to send SIP, and every process it runs."""

    label: str
    host: str
    port: int
    procs: list[Proc] = field(default_factory=list)
    admin: str | None = None  # p2psip's admin API, host:port
    dht: str | None = None  # p2psip: the DHT node other sites bootstrap from

    @property
    def sip(self) -> tuple[str, int]:
        return (self.host, self.port)

    def pids(self) -> list[int]:
        return [pid for p in self.procs if p.alive() for pid in process_tree(p.popen.pid)]

    def stats(self) -> dict[str, float]:
        """p2psip's /stats counters ({} for Kamailio, or when unreachable)."""
        if self.admin is None:
            return {}
        req = urllib.request.Request(
            f"http://{self.admin}/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                counters: dict[str, float] = json.load(r)["counters"]
                return counters
        except (OSError, ValueError, KeyError):
            return {}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def _wait(check: object, proc: Proc, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check(what)
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise StartError(f"{proc.name}: {what} after {timeout:.0f} s; its log:\n{proc.tail()}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.HTTPError):
        return False


def _redis_pong(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --- p2psip ----------------------------------------------------------------------------


def write_users_file(path: Path, users: Sequence[str]) -> None:
    """p2psip's users file: MD5 HA1s only, so the challenge offers MD5, which SIPp knows."""
    with path.open("w") as f:
        for user in users:
            ha1 = hashlib.md5(f"{user}:{DOMAIN}:{PASSWORD}".encode()).hexdigest()
            f.write(f'[users."{user}"]\nha1_md5 = "{ha1}"\n')


def keygen(data_dir: Path) -> Path:
    """The site key pair in ``data_dir``; returns its public key file."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "keygen", "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=ROOT, env=_env({}), timeout=60, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise StartError(f"p2psip keygen failed: {out.stderr.strip()}")
    return data_dir / "site.pub"


def start_p2psip(
    setup: Setup,
    workdir: Path,
    host: str,
    *,
    name: str = "site",
    users: Sequence[str] | None = None,
    bootstrap: Sequence[str] = (),
    trust_dir: Path | None = None,
    tools: dict[str, str],
) -> Server:
    """A p2psip site on ``host``, with its Redis and DHT node for the Redis setups."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    server = Server(setup.key, host, free_port(host))
    env = _env(P2PSIP_TUNING)
    common = ["--data-dir", str(data), "--log-level", "WARNING"]
    if trust_dir is not None:
        common += ["--trust", str(trust_dir)]
    python = [sys.executable, "-m", "proxy.cli"]
    try:
        extra: list[str] = []
        if setup.redis:
            redis_port = free_port(host)
            redis = Proc(f"{name} redis-server", [
                tools["redis-server"], "--port", str(redis_port), "--bind", host,
                "--dir", str(workdir), "--save", "", "--appendonly", "yes",
                "--appendfsync", "everysec", "--daemonize", "no",
            ], workdir / "redis.log", env)  # fmt: skip
            server.procs.append(redis)
            _wait(lambda: _redis_pong(host, redis_port), redis, "no PONG")
            dht_addr = f"{host}:{free_port(host)}"
            dht = Proc(f"{name} dht", [
                *python, "dht", "--listen", dht_addr,
                "--redis-url", f"redis://{host}:{redis_port}/1", *common,
                *(f"--bootstrap={b}" for b in bootstrap),
            ], workdir / "dht.log", env)  # fmt: skip
            server.procs.append(dht)
            extra += ["--redis-url", f"redis://{host}:{redis_port}/0", f"--bootstrap={dht_addr}"]
            server.dht = dht_addr
        if users is not None:
            users_file = workdir / "users.toml"
            write_users_file(users_file, users)
            extra += ["--users", str(users_file)]
        if setup.workers:
            extra += ["--workers", str(setup.workers)]
        server.admin = f"{host}:{free_port(host)}"
        proxy_dht = f"{host}:{free_port(host)}"
        server.dht = server.dht or proxy_dht
        proxy = Proc(f"{name} proxy", [
            *python, "run", "--sip-listen", f"{host}:{server.port}",
            "--dht-listen", proxy_dht,
            "--tls-listen", f"{host}:{free_port(host)}",
            "--admin-listen", server.admin, "--admin-token", ADMIN_TOKEN,
            "--domain", DOMAIN, "--site-id", name, *common, *extra,
            *(f"--bootstrap={b}" for b in bootstrap),
        ], workdir / "proxy.log", env)  # fmt: skip
        server.procs.append(proxy)
        _wait(lambda: answers_options(host, server.port), proxy, "no answer to OPTIONS")
        _wait(lambda: _http_ok(f"http://{server.admin}/ready"), proxy, "not ready (/ready)")
    except BaseException:
        server.stop()
        raise
    return server


# --- Kamailio --------------------------------------------------------------------------


def write_kamailio_users(db_dir: Path, users: Sequence[str]) -> None:
    """The db_text table bench/kamailio.cfg loads into its ``users`` htable: user -> HA1."""
    db_dir.mkdir(parents=True, exist_ok=True)
    (db_dir / "version").write_text("table_name(string) table_version(int)\nhtable:2\n")
    with (db_dir / "htable").open("w") as f:
        f.write("id(int,auto) key_name(string) key_type(int) value_type(int) "
                "key_value(string) expires(int)\n")  # fmt: skip
        for n, user in enumerate(users, 1):
            ha1 = hashlib.md5(f"{user}:{DOMAIN}:{PASSWORD}".encode()).hexdigest()
            f.write(f"{n}:{user}:0:0:{ha1}:0\n")


def start_kamailio(
    workdir: Path, host: str, *, users: Sequence[str] | None, tools: dict[str, str]
) -> Server:
    # Once more on another port if it exits at start: seen once in a full run, exit
    # with an empty log, between two steps that both started fine.
    try:
        return _start_kamailio(workdir, host, users=users, tools=tools)
    except StartError as exc:
        log.warning("kamailio did not start (%s): trying once more", str(exc).splitlines()[0])
        return _start_kamailio(workdir, host, users=users, tools=tools)


def _start_kamailio(
    workdir: Path, host: str, *, users: Sequence[str] | None, tools: dict[str, str]
) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    run = workdir / "run"
    run.mkdir(exist_ok=True)
    server = Server("kamailio", host, free_port(host))
    argv = [
        tools["kamailio"], "-f", str(KAMAILIO_CFG), "-DD", "-E",
        "-m", "1024", "-M", "16",  # shared memory: 100,000 contacts fit with room to spare
        "-l", f"udp:{host}:{server.port}", "-Y", str(run), "-P", str(run / "kamailio.pid"),
    ]  # fmt: skip
    if users is not None:
        write_kamailio_users(workdir / "db", users)
        argv += ["-A", "WITH_AUTH", "-A", f'USERS_DB="text://{workdir / "db"}"']
    proc = Proc("kamailio", argv, workdir / "kamailio.log", _env({}))
    server.procs.append(proc)
    try:
        _wait(lambda: answers_options(host, server.port), proc, "no answer to OPTIONS")
    except BaseException:
        server.stop()
        raise
    return server


def start(
    setup: Setup, workdir: Path, host: str, *, users: Sequence[str] | None,
    tools: dict[str, str],
) -> Server:  # fmt: skip
    if setup.is_p2psip:
        return start_p2psip(setup, workdir, host, users=users, tools=tools)
    return start_kamailio(workdir, host, users=users, tools=tools)


def start_two_sites(
    setup: Setup, workdir: Path, hosts: tuple[str, str], tools: dict[str, str]
) -> tuple[Server, Server]:
    """Two p2psip sites that trust each other, one overlay: (callee's, caller's)."""
    trust = workdir / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    for n in (1, 2):
        shutil.copy(keygen(workdir / f"site{n}" / "data"), trust / f"site{n}.pub")
    home = start_p2psip(setup, workdir / "site1", hosts[0], name="site1", trust_dir=trust,
                        tools=tools)  # fmt: skip
    try:
        caller = start_p2psip(
            setup, workdir / "site2", hosts[1], name="site2", trust_dir=trust,
            bootstrap=[home.dht or ""], tools=tools,
        )  # fmt: skip
    except BaseException:
        home.stop()
        raise
    return home, caller

"""Sites as docker-compose declares them, run as plain processes on loopback addresses.

No Docker engine runs on the test machines, so each site's ``dht`` and ``proxy``
services run the very ``command`` that docker-compose.yml gives them, with the same
``P2PSIP_*`` environment variables, filled in with this machine's addresses: site *n*
lives on 127.0.0.*n*, and all sites share one throwaway redis-server (a database per
service, as a site's own Redis would hold them). If the compose file sets a variable
this harness does not know how to fill, or drops one it fills, :func:`service_env`
fails: the file cannot drift from what the tests run.

A site may also live elsewhere, e.g. in a network namespace (tests/test_partition.py):
:meth:`Deployment.prepare` then takes its address, the ports free there, the command
prefix its processes run under (``ip netns exec NS``), a ``probe`` that runs readiness
checks where its network is, and its own Redis.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from .site import ROOT, free_port, sip_options

COMPOSE_FILE = ROOT / "docker-compose.yml"
SITE_SERVICES = ("dht", "proxy")  # the p2psip services of a site (redis is Redis)

T = TypeVar("T")
Probe = Callable[[Callable[[], T]], T]


def run_here(check: Callable[[], T]) -> T:
    """The default probe: the site shares the test process's network."""
    return check()


def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict) and "services" in data, "docker-compose.yml has no services"
    return data


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no {name!r} service"
    svc = services[name]
    assert isinstance(svc, dict)
    return svc


def service_command(name: str) -> list[str]:
    command = service(name).get("command")
    assert isinstance(command, list) and all(isinstance(c, str) for c in command), (
        f"service {name}: command must be a list of strings"
    )
    return command


def service_env(name: str, values: dict[str, str]) -> dict[str, str]:
    """The service's environment with every variable set to this harness's value."""
    declared = service(name).get("environment") or {}
    assert isinstance(declared, dict), f"service {name}: environment must be a mapping"
    unknown = set(declared) - set(values)
    assert not unknown, f"service {name} sets {sorted(unknown)}, which the tests do not run with"
    missing = set(values) - set(declared)
    assert not missing, f"the tests set {sorted(missing)} that service {name} does not declare"
    return {k: values[k] for k in declared}


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}
        env = {**base, **self.env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, env=env, cwd=ROOT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""


@dataclass
class SiteProcesses:
    """One site: its DHT node service and its proxy service, on ``host``."""

    name: str
    host: str
    data_dir: Path
    sip_port: int
    dht_port: int  # the standalone node (service "dht")
    proxy_dht_port: int  # the proxy's own node
    admin_port: int
    services: dict[str, Service] = field(default_factory=dict)
    prefix: tuple[str, ...] = ()  # its processes run as [*prefix, python, ...]
    probe: Probe[Any] = run_here  # runs the harness's readiness checks where it lives
    redis_base: str | None = None  # its own Redis (redis://HOST:PORT), else the shared one

    @property
    def sip(self) -> str:
        return f"{self.host}:{self.sip_port}"

    @property
    def dht(self) -> str:
        return f"{self.host}:{self.dht_port}"

    def stop(self) -> None:
        for svc in reversed(list(self.services.values())):
            svc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{s.log()}" for n, s in self.services.items())


class Deployment:
    """Sites sharing one domain and one trust folder, joined into one overlay."""

    def __init__(
        self,
        workdir: Path,
        redis_url: str | None,
        domain: str = "example.com",
        *,
        tuning: dict[str, str] | None = None,
    ) -> None:
        """``redis_url`` is the Redis every site shares (None: each site brings its own).
        ``tuning`` holds P2PSIP_* settings the compose file leaves at their defaults,
        given to both services of every site (e.g. a shorter ``P2PSIP_T1``)."""
        self.workdir = workdir
        self.redis_base = redis_url.rsplit("/", 1)[0] if redis_url else None
        self.domain = domain
        self.tuning = dict(tuning or {})
        assert all(k.startswith("P2PSIP_") for k in self.tuning), self.tuning
        self.trust_dir = workdir / "trust"
        self.trust_dir.mkdir(exist_ok=True)
        self.token = "test-admin-token"
        self.sites: list[SiteProcesses] = []

    def prepare(
        self,
        n: int,
        *,
        host: str | None = None,
        ports: tuple[int, int, int, int] | None = None,
        prefix: Sequence[str] = (),
        probe: Probe[Any] = run_here,
        redis_url: str | None = None,
    ) -> SiteProcesses:
        """Keys and ports for site ``n`` on 127.0.0.n (n >= 2); its key joins the trust dir.

        A site elsewhere gives its ``host``, the ``ports`` free there (SIP, DHT node,
        proxy's DHT node, admin), the ``prefix`` and ``probe`` of :class:`SiteProcesses`
        and, unless the sites share one, its own ``redis_url``.
        """
        host = host or f"127.0.0.{n}"
        data = self.workdir / f"site{n}"
        keygen = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "keygen", "--data-dir", str(data)],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert keygen.returncode == 0, keygen.stderr
        shutil.copy(data / "site.pub", self.trust_dir / f"site{n}.pub")
        sip, dht, proxy_dht, admin = ports or tuple(free_port(host) for _ in range(4))
        site = SiteProcesses(
            f"site{n}", host, data, sip, dht, proxy_dht, admin, prefix=tuple(prefix),
            probe=probe, redis_base=redis_url.rsplit("/", 1)[0] if redis_url else None,
        )  # fmt: skip
        self.sites.append(site)
        return site

    def start(self, site: SiteProcesses, bootstrap: list[str], *, timeout: float = 20.0) -> None:
        n = int(site.host.rsplit(".", 1)[1])
        redis_base = site.redis_base or self.redis_base
        assert redis_base, f"{site.name} has no Redis"
        common = {
            "P2PSIP_DATA_DIR": str(site.data_dir),
            "P2PSIP_TRUST": str(self.trust_dir),
        }
        values = {
            "dht": {
                **common,
                "P2PSIP_DHT_LISTEN": site.dht,
                "P2PSIP_BOOTSTRAP": ",".join(bootstrap),
                "P2PSIP_REDIS_URL": f"{redis_base}/{(2 * n + 1) % 16}",
            },
            "proxy": {
                **common,
                "P2PSIP_SITE_ID": site.name,
                "P2PSIP_DOMAIN": self.domain,
                "P2PSIP_ADVERTISE": site.host,
                "P2PSIP_SIP_LISTEN": site.sip,
                "P2PSIP_DHT_LISTEN": f"{site.host}:{site.proxy_dht_port}",
                # As in the compose file: the site's own DHT node first, then the others.
                "P2PSIP_BOOTSTRAP": ",".join([site.dht, *bootstrap]),
                "P2PSIP_REDIS_URL": f"{redis_base}/{(2 * n) % 16}",
                "P2PSIP_ADMIN_LISTEN": f"{site.host}:{site.admin_port}",
                "P2PSIP_ADMIN_TOKEN": self.token,
            },
        }
        for name in SITE_SERVICES:
            argv = [*site.prefix, sys.executable, "-m", "proxy.cli", *service_command(name)]
            env = {**service_env(name, values[name]), **self.tuning}
            svc = Service(name, argv, env, self.workdir / f"{site.name}-{name}.log")
            site.services[name] = svc
            svc.start()
            if name == "dht":
                self._wait_dht(site, svc, timeout)
        self._wait_proxy(site, site.services["proxy"], timeout)

    def _wait_dht(self, site: SiteProcesses, svc: Service, timeout: float) -> None:
        from proxy.config import HostPort
        from proxy.lookup import ping_node

        node = HostPort(site.host, site.dht_port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not svc.alive():
                raise RuntimeError(f"{site.name} dht exited:\n{svc.log()}")
            if site.probe(lambda: asyncio.run(ping_node(node, 0.3, site.data_dir, self.trust_dir))):
                return
        raise RuntimeError(f"{site.name} dht did not answer in {timeout}s:\n{svc.log()}")

    def _wait_proxy(self, site: SiteProcesses, svc: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not svc.alive():
                raise RuntimeError(f"{site.name} proxy exited:\n{svc.log()}")
            reply = site.probe(lambda: sip_options(site.host, site.sip_port, 0.3))
            if reply is not None and reply.startswith(b"SIP/2.0 200"):
                return
        raise RuntimeError(f"{site.name} proxy did not answer OPTIONS in {timeout}s:\n{svc.log()}")

    def start_sites(self, numbers: list[int]) -> list[SiteProcesses]:
        """Prepare every site first (all keys in the trust dir), then start them, each
        bootstrapped from the first site's DHT node."""
        sites = [self.prepare(n) for n in numbers]
        first = sites[0]
        for site in sites:
            self.start(site, [] if site is first else [first.dht])
        return sites

    def close(self) -> None:
        for site in self.sites:
            site.stop()


@pytest.fixture
def deployment(tmp_path: Path, redis_server: Any) -> Any:
    d = Deployment(tmp_path, redis_server.url)
    yield d
    d.close()

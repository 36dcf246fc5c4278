"""Run a real ``p2psip run`` process for end-to-end tests, and talk SIP to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on both UDP and TCP (SIP listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free port")


def sip_options(host: str, port: int, timeout: float = 0.5) -> bytes | None:
    """Send one OPTIONS over UDP to the proxy itself; return the raw response or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        lport = s.getsockname()[1]
        branch = "z9hG4bK" + uuid.uuid4().hex[:12]
        msg = (
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch={branch};rport\r\n"
            f"From: <sip:probe@127.0.0.1>;tag={uuid.uuid4().hex[:8]}\r\n"
            f"To: <sip:{host}:{port}>\r\n"
            f"Call-ID: {uuid.uuid4().hex}\r\n"
            "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        s.settimeout(timeout)
        s.sendto(msg, (host, port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


class Site:
    """One ``p2psip run`` process on ``host``; ``args`` are extra command-line flags."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", args: list[str] | None = None):
        self.workdir = workdir
        self.host = host
        self.port = free_port(host)
        self.dht_port = free_port(host)
        self.admin_port = free_port(host)  # the admin API (HTTP), unless args name another
        self.args = args or []
        self.log_path = workdir / f"site-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sip(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def dht(self) -> str:
        return f"{self.host}:{self.dht_port}"

    @property
    def admin(self) -> str:
        return f"{self.host}:{self.admin_port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "proxy.cli", "run",
            "--sip-listen", self.sip,
            "--data-dir", str(self.workdir / "data"),
            *([] if "--admin-listen" in self.args else ["--admin-listen", self.admin]),
            *([] if "--dht-listen" in self.args else ["--dht-listen", self.dht]),
            *self.args,
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> Site:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        env = {k: v for k, v in env.items() if not k.startswith("P2PSIP_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"p2psip exited with {self.proc.returncode}:\n{self.log()}")
            reply = sip_options(self.host, self.port, 0.2)
            if reply is not None and reply.startswith(b"SIP/2.0 200"):
                return self
        raise RuntimeError(f"p2psip did not answer OPTIONS in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def site_factory(tmp_path: Path) -> Iterator[object]:
    sites: list[Site] = []

    def make(*args: str, host: str = "127.0.0.1") -> Site:
        site = Site(tmp_path, host, list(args))
        sites.append(site)
        return site.start()

    yield make
    for site in sites:
        site.stop()

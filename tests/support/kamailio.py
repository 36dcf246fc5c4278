"""A real Kamailio (Debian's ``kamailio`` package) as a neighbouring SIP server.

``tests/data/kamailio/kamailio.cfg`` is filled in (its address, its domain, the p2psip
site it sends every other domain to) and Kamailio runs in the foreground (``-DD -E``) as
a child process, with its pid file, runtime directory and log under the test's tmp_path.
Missing binary: the tests using it skip (``scripts/test`` installs it).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "tests" / "data" / "kamailio" / "kamailio.cfg"
AVAILABLE = shutil.which("kamailio") is not None


class Kamailio:
    def __init__(self, workdir: Path, host: str, port: int, domain: str, p2p: str) -> None:
        """``p2p``: the p2psip site, HOST:PORT, that requests for other domains go to."""
        self.workdir = workdir
        self.host = host
        self.port = port
        self.domain = domain
        self.p2p = p2p
        self.log_path = workdir / "kamailio.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sip(self) -> str:
        return f"{self.host}:{self.port}"

    def config(self) -> Path:
        text = TEMPLATE.read_text()
        for name, value in (
            ("KAM_HOST", self.host),
            ("KAM_PORT", str(self.port)),
            ("KAM_DOMAIN", self.domain),
            ("P2P", self.p2p),
        ):
            text = text.replace(f"@{name}@", value)
        path = self.workdir / "kamailio.cfg"
        path.write_text(text)
        return path

    def start(self, timeout: float = 15.0) -> Kamailio:
        self.workdir.mkdir(parents=True, exist_ok=True)
        run = self.workdir / "run"
        run.mkdir(exist_ok=True)
        cmd = [
            "kamailio", "-DD", "-E", "-f", str(self.config()),
            "-P", str(run / "kamailio.pid"), "-Y", str(run), "-w", str(self.workdir),
            "-m", "32", "-M", "8",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kamailio exited with {self.proc.returncode}:\n{self.log()}")
            if self._answers():
                return self
        raise RuntimeError(f"kamailio did not answer OPTIONS in {timeout}s:\n{self.log()}")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((self.host, 0))
            lport = s.getsockname()[1]
            msg = (
                f"OPTIONS sip:{self.sip} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {self.host}:{lport};branch=z9hG4bK{uuid.uuid4().hex[:12]}\r\n"
                f"From: <sip:probe@{self.host}>;tag={uuid.uuid4().hex[:8]}\r\n"
                f"To: <sip:{self.sip}>\r\nCall-ID: {uuid.uuid4().hex}\r\n"
                "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()
            s.settimeout(0.2)
            s.sendto(msg, (self.host, self.port))
            try:
                return s.recv(65535).startswith(b"SIP/2.0 200")
            except OSError:
                return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

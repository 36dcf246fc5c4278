"""baresip (Debian ``baresip-core``) as a phone in end-to-end tests.

A config folder per phone (UDP on its own loopback address and port, G.711, audio from a
generated 8 kHz WAV file, no sound card), commands given with ``-e`` at start, and the
console output read line by line. Missing binary: the tests using it skip.
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
import threading
import time
import wave
from pathlib import Path

from .site import free_port

AVAILABLE = shutil.which("baresip") is not None
MODULES = Path("/usr/lib/baresip/modules")


def _tone(path: Path, seconds: int = 30) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)  # what G.711 wants: baresip 1.0 does not resample
        w.writeframes(
            b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 8000)))
                for i in range(8000 * seconds)
            )
        )


class Baresip:
    def __init__(
        self,
        workdir: Path,
        aor: str,
        password: str,
        proxy: str,
        *,
        bind_ip: str = "127.0.0.6",
        commands: tuple[str, ...] = (),
        lifetime: int = 30,
        tls: bool = False,
        cafile: Path | None = None,
    ) -> None:
        """``aor`` like ``sip:alice@localhost``; ``proxy`` the outbound proxy host:port.

        ``tls``: register and call over TLS (``proxy`` is then the TLS port), trusting
        the CAs in ``cafile``. baresip 1.0 takes the proxy's certificate without
        checking it (libre 1.x has no verification switch); the file is loaded all the
        same, and a bad one stops it.
        """
        self.dir = workdir / f"baresip-{aor.split(':')[1].split('@')[0]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        port = free_port(bind_ip)
        _tone(self.dir / "tone.wav")
        (self.dir / "config").write_text(
            f"sip_listen\t{bind_ip}:{port}\n"
            f"audio_player\taufile,{self.dir / 'heard.wav'}\n"
            f"audio_source\taufile,{self.dir / 'tone.wav'}\n"
            f"audio_alert\taufile,{self.dir / 'alert.wav'}\n"
            f"module_path\t{MODULES}\n"
            "module\tg711.so\nmodule\taufile.so\n"
            "module_app\taccount.so\nmodule_app\tmenu.so\n"
            + (f"sip_cafile\t{cafile}\n" if cafile is not None else "")
        )
        user = aor.split(":")[1].split("@")[0]
        transport = "tls" if tls else "udp"
        route = ";transport=tls" if tls else ""
        (self.dir / "accounts").write_text(
            f"<{aor};transport={transport}>;auth_user={user};auth_pass={password};"
            f'outbound="sip:{proxy}{route};lr";regint=300\n'
        )
        args = ["baresip", "-f", str(self.dir), "-t", str(lifetime)]
        for command in commands:
            args += ["-e", command]
        self.lines: list[str] = []
        self._proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace",
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, pattern: str, timeout: float = 15.0) -> str:
        """The first output line matching ``pattern`` (a regular expression)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"baresip printed no {pattern!r} in {timeout}s:\n" + self.output())

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._reader.join(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

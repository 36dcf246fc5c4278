"""Pytest plugin: a real, throwaway ``redis-server`` on a free port.

The ``redis_server`` fixture starts one server per test with the append-only file fsynced
on every write, so ``restart()`` (even after ``stop(graceful=False)``, a SIGKILL) comes
back with every acknowledged write. Tests are skipped when redis-server is not installed.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_START_TIMEOUT = 10.0  # seconds until the server must answer PING
_STOP_TIMEOUT = 5.0
_START_ATTEMPTS = 3  # a free port can be taken by someone else before redis binds it


class RedisServerError(RuntimeError):
    """redis-server did not start or stop as asked."""


class RedisServer:
    """One redis-server process bound to 127.0.0.1; ``dir`` keeps its AOF across restarts."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.dir = directory
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def stderr_path(self) -> Path:
        return self.dir / "redis.stderr"

    def start(self) -> None:
        """Start on a fresh free port (retrying if another process grabs it first)."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = _free_port()
            try:
                self._launch()
                return
            except RedisServerError:
                if attempt == _START_ATTEMPTS:
                    raise

    def stop(self, *, graceful: bool = True) -> None:
        """SIGTERM (redis flushes and exits) or, with ``graceful=False``, SIGKILL (a crash)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, *, graceful: bool = True) -> None:
        """Stop, then start again on the same port with the same directory (data kept)."""
        self.stop(graceful=graceful)
        self._launch()

    def _launch(self) -> None:
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        # stderr goes to a file: a pipe nobody drains could block or break the server.
        with self.stderr_path.open("ab") as stderr:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        try:
            self._wait_until_ready()
        except RedisServerError:
            self.stop(graceful=False)
            raise

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RedisServerError(
                    f"redis-server exited with {self._process.returncode} on port {self.port}: "
                    f"{self._tail(self.stderr_path)} {self._tail(self.log_path)}"
                )
            if _answers_ping(self.port):
                return
            time.sleep(0.02)
        raise RedisServerError(
            f"redis-server on port {self.port} did not answer PING within {_START_TIMEOUT} s: "
            f"{self._tail(self.log_path)}"
        )

    @staticmethod
    def _tail(path: Path) -> str:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    """True once the server replies +PONG (not -LOADING while it replays the AOF)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running redis-server; yields ``.url``, ``.port``, ``.stop()``, ``.restart()``."""
    executable = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if executable is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(executable, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop(graceful=False)

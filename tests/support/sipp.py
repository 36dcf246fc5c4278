"""SIPp harness for end-to-end tests: run scenarios, read their statistics, clean up.

A pytest plugin (listed in tests/conftest.py). The ``sipp`` fixture gives a :class:`Sipp`
whose logs live under the test's tmp_path and which kills every SIPp it started at
teardown.

SIPp runs in the foreground with ``-nostdin`` (``-bg`` forks and loses the pid), in its
own session so that teardown can kill its whole process group. Results come from
``-trace_stat`` (the cumulative SuccessfulCall/FailedCall counters of the last row) and
from the exit code. ``SippResult.report()`` shows SIPp's stderr and ``-trace_err`` log,
so an assertion message says why calls failed.

Scenarios live in tests/data/sipp; the keys (``-key name value``, used as ``[name]``)
each one expects are listed in its header comment. :data:`DEFAULT_KEYS` supplies all of
them except ``expected_code``. Everything binds to 127.0.0.1 (``-bind_local``), on free
ports found by binding port 0.

A test that calls a SIPp callee through the proxy first binds the callee's contact with
``Sipp.register_contact`` (register.xml sent from another port, with the ``contact_port``
key), then starts the callee on that port with ``Sipp.start_uas``.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, TypedDict, Unpack

import pytest

Transport = Literal["u1", "t1"]  # SIPp's -t: UDP or TCP, one socket each
Address = tuple[str, int]

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "data" / "sipp"
LOOPBACK = "127.0.0.1"
DEFAULT_DOMAIN = "p2psip.test"
DEFAULT_KEYS: Mapping[str, str] = {"domain": DEFAULT_DOMAIN, "expires": "3600", "caller": "sipp"}

# SIPp exit codes (``sipp -h``). -1 and -2 arrive as 255 and 254.
EXIT_ALL_OK = 0
EXIT_SOME_FAILED = 1
EXIT_INTERNAL_COMMAND = 97
EXIT_NO_CALLS = 99
EXIT_FATAL = 255
EXIT_BIND_FAILED = 254

_ENTRY_START = re.compile(r"(?<=\S)(\d{4}-\d\d-\d\d\t\d\d:\d\d:\d\d\.\d+\t)")
_WAIT_GRACE = 10.0  # seconds a run may outlive its own -timeout before we kill it


def free_port() -> int:
    """A port on 127.0.0.1 that is free for both UDP and TCP right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


def contact_params(transport: Transport) -> str:
    """Contact URI parameters that make a callee reachable over ``transport``."""
    return ";transport=tcp" if transport == "t1" else ""


@dataclass(frozen=True, slots=True)
class LogPaths:
    """Where one SIPp run writes. Any of them may be missing if SIPp died early."""

    stats: Path
    errors: Path
    screen: Path
    messages: Path
    stdout: Path
    stderr: Path

    @classmethod
    def under(cls, directory: Path, name: str) -> LogPaths:
        directory.mkdir(parents=True, exist_ok=True)
        suffixes = ("_stats.csv", "_errors.log", "_screen.log", "_messages.log", ".out", ".err")
        return cls(*(directory / f"{name}{suffix}" for suffix in suffixes))


@dataclass(frozen=True, slots=True)
class SippCommand:
    """Everything needed to build one SIPp command line."""

    scenario: Path
    local_port: int
    remote: Address | None = None  # None for a UAS, which only listens
    transport: Transport = "u1"
    local_ip: str = LOOPBACK
    rate: float | None = None  # -r calls per second (SIPp's default is 10)
    calls: int | None = None  # -m: exit after this many calls
    max_concurrent: int | None = None  # -l
    service: str | None = None  # -s: [service], the user part of the Request-URI
    inject: Path | None = None  # -inf CSV file: [field0], [field1], ...
    keys: Mapping[str, str] = field(default_factory=dict)  # -key name value: [name]
    variables: Mapping[str, str] = field(default_factory=dict)  # -set name value: [$name]
    call_duration_ms: int | None = None  # -d: the length of <pause/>
    timeout_s: float | None = None  # -timeout plus -timeout_error: a hung run fails
    recv_timeout_ms: int | None = None  # -recv_timeout: a call waiting longer fails
    trace_messages: bool = False  # -trace_msg: every message, verbose
    extra_args: Sequence[str] = ()

    def argv(self, logs: LogPaths, binary: str = "sipp") -> list[str]:
        args = [binary]
        if self.remote is not None:
            args.append(f"{self.remote[0]}:{self.remote[1]}")
        args += ["-sf", str(self.scenario), "-t", self.transport]
        args += ["-i", self.local_ip, "-p", str(self.local_port), "-bind_local"]
        args += ["-ci", LOOPBACK, "-nostdin"]
        for flag, value in (
            ("-r", self.rate),
            ("-m", self.calls),
            ("-l", self.max_concurrent),
            ("-s", self.service),
            ("-inf", self.inject),
            ("-d", self.call_duration_ms),
            ("-recv_timeout", self.recv_timeout_ms),
        ):
            if value is not None:
                args += [flag, _number(value) if isinstance(value, float) else str(value)]
        if self.timeout_s is not None:
            args += ["-timeout", f"{_number(self.timeout_s)}s", "-timeout_error"]
        for name, value in self.keys.items():
            args += ["-key", name, value]
        for name, value in self.variables.items():
            args += ["-set", name, value]
        args += ["-trace_stat", "-stf", str(logs.stats), "-fd", "1"]
        args += ["-trace_err", "-error_file", str(logs.errors)]
        args += ["-trace_screen", "-screen_file", str(logs.screen)]
        if self.trace_messages:
            args += ["-trace_msg", "-message_file", str(logs.messages)]
        return [*args, *self.extra_args]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True, slots=True)
class SippResult:
    """How a SIPp run ended. ``exit_code`` is -N if SIPp died from signal N."""

    name: str
    argv: tuple[str, ...]
    exit_code: int
    successful: int
    failed: int
    created: int
    stats: Mapping[str, str]  # the last row of the -trace_stat file, by column name
    logs: LogPaths
    killed: bool = False  # it outlived its deadline, or the test ended first

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_ALL_OK and self.failed == 0 and not self.killed

    @property
    def error_log(self) -> Path:
        return self.logs.errors

    def report(self, tail_chars: int = 4000) -> str:
        """A summary plus the tails of SIPp's stderr and error log."""
        lines = [
            f"sipp {self.name}: exit_code={self.exit_code} created={self.created} "
            f"successful={self.successful} failed={self.failed} killed={self.killed}",
            "command: " + " ".join(self.argv),
        ]
        for label, path in (("stderr", self.logs.stderr), ("error log", self.logs.errors)):
            # SIPp runs the error log's entries together; start each on its own line.
            text = _ENTRY_START.sub(r"\n\1", _read(path)).strip()
            if text:
                text = text if len(text) <= tail_chars else "...\n" + text[-tail_chars:]
                lines += [f"--- {label} ({path}) ---", text]
        return "\n".join(lines)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def read_stats(path: Path) -> dict[str, str]:
    """The last row of a -trace_stat file (';'-separated), or {} if it has none."""
    rows = list(csv.reader(_read(path).splitlines(), delimiter=";"))
    return dict(zip(rows[0], rows[-1], strict=False)) if len(rows) >= 2 else {}


def _counter(stats: Mapping[str, str], name: str) -> int:
    value = stats.get(name, "")
    return int(value) if value.isdigit() else 0


class SippProcess:
    """One running SIPp: ``wait`` for it to finish, or ``stop`` it (a UAS or a stub)."""

    def __init__(self, name: str, command: SippCommand, logs: LogPaths, binary: str) -> None:
        self.name = name
        self.command = command
        self.logs = logs
        self.argv = tuple(command.argv(logs, binary))
        self._result: SippResult | None = None
        self._killed = False
        self._outputs: tuple[IO[bytes], IO[bytes]] = (
            logs.stdout.open("wb"),
            logs.stderr.open("wb"),
        )
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._outputs[0],
            stderr=self._outputs[1],
            cwd=logs.stats.parent,
            start_new_session=True,  # its own process group, killed as one
        )

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def address(self) -> Address:
        return (self.command.local_ip, self.command.local_port)

    @property
    def port(self) -> int:
        return self.command.local_port

    def running(self) -> bool:
        return self._popen.poll() is None

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Block until SIPp's sockets are bound: its first statistics row comes after."""
        deadline = time.monotonic() + timeout
        while len(_read(self.logs.stats).splitlines()) < 2:
            if not self.running():
                raise RuntimeError(f"sipp exited during start-up\n{self.wait(0).report()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"sipp not ready after {timeout}s\n{self.wait(0).report()}")
            time.sleep(0.02)

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for SIPp to exit by itself; kill it after ``timeout`` seconds (by default
        its own -timeout plus a grace period, or never if it has none)."""
        if self._result is None:
            if timeout is None and self.command.timeout_s is not None:
                timeout = self.command.timeout_s + _WAIT_GRACE
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            self._result = self._collect()
        return self._result

    def stop(self, timeout: float = 10.0) -> SippResult:
        """Ask SIPp to finish its open calls and exit (SIGUSR1); kill it if it won't."""
        if self._result is None and self.running():
            self._popen.send_signal(signal.SIGUSR1)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.running():
            self._killed = True
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.killpg(self._popen.pid, signal.SIGKILL)
        self._popen.wait()

    def _collect(self) -> SippResult:
        self._popen.wait()
        for output in self._outputs:
            output.close()
        stats = read_stats(self.logs.stats)
        return SippResult(
            name=self.name,
            argv=self.argv,
            exit_code=self._popen.returncode,
            successful=_counter(stats, "SuccessfulCall(C)"),
            failed=_counter(stats, "FailedCall(C)"),
            created=_counter(stats, "TotalCallCreated"),
            stats=stats,
            logs=self.logs,
            killed=self._killed,
        )


class Options(TypedDict, total=False):
    """Keyword options of :class:`Sipp` methods, passed on to :class:`SippCommand`."""

    rate: float
    calls: int
    max_concurrent: int
    variables: Mapping[str, str]
    call_duration_ms: int
    timeout_s: float | None
    recv_timeout_ms: int
    trace_messages: bool
    extra_args: Sequence[str]


class Sipp:
    """Starts SIPp scenarios with their logs under ``workdir``; ``close`` kills them all."""

    def __init__(self, workdir: Path, *, binary: str = "sipp", scenario_dir: Path = SCENARIO_DIR):
        self.workdir = workdir
        self.binary = binary
        self.scenario_dir = scenario_dir
        self._processes: list[SippProcess] = []
        self._numbers = itertools.count(1)

    def start(
        self,
        scenario: str,
        *,
        remote: Address | None = None,
        transport: Transport = "u1",
        local_port: int | None = None,
        service: str | None = None,
        users: Sequence[Sequence[str]] | Path | None = None,
        keys: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> SippProcess:
        """Start ``scenario`` (a file in scenario_dir, or a path) in the background.

        ``local_port`` defaults to a free port; ``users`` are the rows of an injection
        file (or a ready one); ``keys`` go over DEFAULT_KEYS, ``contact_params`` for the
        transport and ``contact_port`` = the local port.
        """
        name = f"{next(self._numbers):03d}_{Path(scenario).stem}"
        if users is not None and not isinstance(users, Path):
            users = self._write_users(name, users)
        port = free_port() if local_port is None else local_port
        defaults = {"contact_params": contact_params(transport), "contact_port": str(port)}
        command = SippCommand(
            scenario=self.scenario_dir / scenario,  # an absolute scenario path wins
            local_port=port,
            remote=remote,
            transport=transport,
            service=service,
            inject=users,
            keys={**DEFAULT_KEYS, **defaults, **(keys or {})},
            **options,
        )
        process = SippProcess(name, command, LogPaths.under(self.workdir, name), self.binary)
        self._processes.append(process)
        return process

    def run(
        self,
        scenario: str,
        *,
        remote: Address | None = None,
        transport: Transport = "u1",
        service: str | None = None,
        users: Sequence[Sequence[str]] | Path | None = None,
        keys: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> SippResult:
        """Run ``scenario`` to completion, by default within a 15 s -timeout."""
        options.setdefault("timeout_s", 15.0)
        process = self.start(
            scenario,
            remote=remote,
            transport=transport,
            service=service,
            users=users,
            keys=keys,
            **options,
        )
        return process.wait()

    def close(self) -> None:
        """Kill every SIPp still running."""
        for process in self._processes:
            process.kill()
            process.wait(0)

    def register(
        self,
        remote: Address,
        users: Sequence[Sequence[str]],
        *,
        transport: Transport = "u1",
        domain: str = DEFAULT_DOMAIN,
        expires: int = 3600,
        keys: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> SippResult:
        """One REGISTER per row of ``users``, by default at 100/s. Rows (user,) use
        register.xml; rows (user, password) use register_auth.xml with -auth_uri domain.
        The Contact is sip:user@127.0.0.1:<local port>, or keys["contact_port"]."""
        with_auth = any(len(row) > 1 for row in users)
        # A REGISTER has no dialog: never BYE or CANCEL one that failed.
        extra = ["-default_behaviors", "all,-bye"]
        if with_auth:
            extra += ["-auth_uri", domain]
        options["extra_args"] = [*extra, *options.get("extra_args", ())]
        options.setdefault("rate", 100)
        options.setdefault("calls", len(users))
        return self.run(
            "register_auth.xml" if with_auth else "register.xml",
            remote=remote,
            transport=transport,
            users=users,
            keys={"domain": domain, "expires": str(expires), **(keys or {})},
            **options,
        )

    def register_contact(
        self,
        remote: Address,
        user: str,
        contact_port: int,
        *,
        password: str | None = None,
        transport: Transport = "u1",
        domain: str = DEFAULT_DOMAIN,
        expires: int = 3600,
        **options: Unpack[Options],
    ) -> SippResult:
        """Bind sip:{user}@{domain} to sip:{user}@127.0.0.1:{contact_port} (with
        ";transport=tcp" for t1) before a callee SIPp starts on that port. The REGISTER
        leaves from another free port, so the two never compete for contact_port."""
        options.setdefault("timeout_s", 10.0)
        return self.register(
            remote,
            [(user,) if password is None else (user, password)],
            transport=transport,
            domain=domain,
            expires=expires,
            keys={"contact_port": str(contact_port)},
            **options,
        )

    def start_uas(
        self,
        *,
        port: int | None = None,
        transport: Transport = "u1",
        scenario: str = "uas.xml",
        keys: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> SippProcess:
        """Start a callee (uas.xml) on ``port`` (default: a free one); return once it listens."""
        process = self.start(scenario, transport=transport, local_port=port, keys=keys, **options)
        process.wait_ready()
        return process

    def call(
        self,
        remote: Address,
        service: str,
        *,
        transport: Transport = "u1",
        domain: str = DEFAULT_DOMAIN,
        keys: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> SippResult:
        """Calls (default 1, at 10/s) to sip:service@domain through ``remote`` (uac.xml)."""
        options.setdefault("calls", 1)
        options.setdefault("rate", 10)
        return self.run(
            "uac.xml",
            remote=remote,
            transport=transport,
            service=service,
            keys={"domain": domain, **(keys or {})},
            **options,
        )

    def call_expecting_failure(
        self,
        remote: Address,
        service: str,
        status: int,
        *,
        transport: Transport = "u1",
        domain: str = DEFAULT_DOMAIN,
        keys: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> SippResult:
        """Calls that count as successful only if rejected with ``status`` and ACKed."""
        options.setdefault("calls", 1)
        options.setdefault("rate", 10)
        return self.run(
            "uac_expect_fail.xml",
            remote=remote,
            transport=transport,
            service=service,
            keys={"domain": domain, "expected_code": str(status), **(keys or {})},
            **options,
        )

    def _write_users(self, name: str, rows: Sequence[Sequence[str]]) -> Path:
        path = self.workdir / f"{name}_users.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(["SEQUENTIAL", *(";".join(row) for row in rows)]) + "\n")
        return path


@pytest.fixture
def sipp(tmp_path: Path) -> Iterator[Sipp]:
    """A :class:`Sipp` logging under tmp_path/sipp; kills all its SIPp processes after."""
    harness = Sipp(tmp_path / "sipp")
    try:
        yield harness
    finally:
        harness.close()

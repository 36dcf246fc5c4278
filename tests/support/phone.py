"""Real pjsua2 phones for end-to-end tests, and the ``phone_factory`` fixture.

Each :class:`Phone` runs ``phone_agent.py`` in a child process (pjsua2 allows one
Endpoint per process) and drives it over JSON lines. The API is blocking and every
wait has a timeout, so a misbehaving proxy fails a test instead of hanging it::

    alice = phone_factory("alice")
    bob = phone_factory("bob", transport="tcp")
    assert bob.register(proxy, "bob", "example.com", password="pw") == 200
    alice.register(proxy, "alice", "example.com", password="pw")
    alice.call("sip:bob@example.com")
    bob.wait_incoming()
    bob.answer()
    alice.wait_state("CONFIRMED")

A phone that never registered has no outbound proxy and sends requests straight to
the target URI. Each phone tracks a *current call*: the last one it placed
(:meth:`Phone.call`) or received (:meth:`Phone.wait_incoming`). Call methods act on
it unless given an explicit ``handle`` (from the dicts they return).

Set ``P2PSIP_PHONE_LOG_LEVEL=5`` to make the agents log every SIP message to stderr;
the tail of a phone's log is appended to every error it raises.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import pytest

AGENT = Path(__file__).with_name("phone_agent.py")
Transport = Literal["udp", "tcp", "tls"]
Event = dict[str, Any]
PhoneFactory = Callable[..., "Phone"]

DEFAULT_TIMEOUT = 10.0
START_TIMEOUT = 15.0
CLOSE_TIMEOUT = 5.0
LOG_TAIL_LINES = 200


class PhoneError(Exception):
    """The phone refused a command, died, or a call ended in the wrong state."""


class PhoneTimeout(PhoneError):
    """Nothing matching arrived in time."""


class Phone:
    """A pjsua2 phone in a child process, with a blocking API."""

    def __init__(
        self,
        name: str,
        transport: Transport = "udp",
        bind_ip: str = "127.0.0.1",
        *,
        auto_ringing: bool = True,
        t1_ms: int | None = None,
        log_level: int | None = None,
        start_timeout: float = START_TIMEOUT,
        command_prefix: Sequence[str] = (),
        outbound: bool = False,
        tls_ca: str | None = None,
        tls_verify: bool = False,
        sips: bool = False,
    ) -> None:
        """Start the phone; its SIP transport listens on an ephemeral port of bind_ip.

        ``auto_ringing`` makes the phone answer incoming INVITEs with 180 at once.
        ``t1_ms`` shrinks the SIP T1 timer (Timer B/F become 64*T1) for tests that
        wait for a 408 over UDP. ``log_level`` is pjsua's (0-6; default 1, or
        ``$P2PSIP_PHONE_LOG_LEVEL``). ``command_prefix`` goes in front of the agent's
        command line, e.g. ``["ip", "netns", "exec", "NS"]`` to run it in a namespace
        (whose ``bind_ip`` it then binds). ``outbound`` makes it register with RFC 5626
        outbound (``Supported: outbound``, ``+sip.instance`` and ``reg-id=1``).

        Over ``"tls"``, ``tls_ca`` is a PEM file of the CAs the phone trusts and
        ``tls_verify`` makes it refuse a proxy whose certificate they do not vouch for
        (for its address); without it the phone takes any certificate, as many do.
        ``sips`` (TLS only) makes it speak SIPS (RFC 5630): ``sips:`` proxy and Contact,
        where it would write ``sip:...;transport=tls``.
        """
        if sips and transport != "tls":
            raise ValueError("sips needs transport='tls'")
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"transport must be 'udp', 'tcp' or 'tls', not {transport!r}")
        self.name = name
        self.transport: Transport = transport
        self.bind_ip = bind_ip
        self.port = 0
        self.last_registration: Event | None = None
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._next_id = 1
        self._current_call: int | None = None
        self._taken_incoming: set[int] = set()
        self._reg_generation = 0
        self._stdout_done = False
        self._closed = False

        if log_level is None:
            log_level = int(os.environ.get("P2PSIP_PHONE_LOG_LEVEL", "1"))
        cmd = [
            *command_prefix,
            sys.executable,
            str(AGENT),
            "--name",
            name,
            "--transport",
            transport,
            "--bind-ip",
            bind_ip,
            "--log-level",
            str(log_level),
        ]
        if t1_ms:
            cmd += ["--t1-ms", str(t1_ms)]
        if tls_ca:
            cmd += ["--tls-ca", tls_ca]
        if tls_verify:
            cmd.append("--tls-verify")
        if sips:
            cmd.append("--sips")
        if not auto_ringing:
            cmd.append("--no-auto-ringing")
        if outbound:
            cmd.append("--outbound")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, name=f"phone-{name}-out", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"phone-{name}-err", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        try:
            ready = self._wait_event(lambda e: e["type"] in ("ready", "fatal"), start_timeout)
            if ready["type"] == "fatal":
                raise PhoneError(self._describe(f"agent failed to start: {ready['error']}"))
        except BaseException:
            self.close()
            raise
        self.port = int(ready["port"])

    def __repr__(self) -> str:
        return f"Phone({self.name!r}, {self.transport}, {self.bind_ip}:{self.port})"

    def __enter__(self) -> Phone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uri(self) -> str:
        """Where to reach this phone directly, without any proxy."""
        tp = "" if self.transport == "udp" else f";transport={self.transport}"
        host = f"[{self.bind_ip}]" if ":" in self.bind_ip else self.bind_ip
        return f"sip:{self.name}@{host}:{self.port}{tp}"

    # -- registration ---------------------------------------------------------

    def register(
        self,
        proxy: str,
        user: str,
        domain: str,
        password: str | None = None,
        expires: int = 300,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        registrar: str | None = None,
    ) -> int:
        """REGISTER sip:{user}@{domain} through the outbound proxy "host:port".

        The REGISTER's Request-URI is ``sip:{proxy}`` unless ``registrar`` gives another
        (e.g. ``"sip:example.com"``; it is never resolved, the Route set wins). Digest
        credentials answer any realm. From now on calls go through the proxy too.
        Returns the final status code (200, 401/403 after failed auth, 408, ...).
        Registering again with identical arguments refreshes the same registration;
        anything else replaces the account (the old one is unregistered first).
        """
        mark = len(self._events)
        reply = self._request(
            {
                "cmd": "register",
                "proxy": proxy,
                "user": user,
                "domain": domain,
                "password": password,
                "expires": expires,
                "registrar": registrar,
            }
        )
        self._reg_generation = int(reply["generation"])
        return self._wait_reg(mark, timeout)

    def unregister(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """REGISTER with Expires: 0 for the current registration; returns the status code."""
        mark = len(self._events)
        self._request({"cmd": "unregister"})
        return self._wait_reg(mark, timeout)

    def _wait_reg(self, mark: int, timeout: float) -> int:
        generation = self._reg_generation
        event = self._wait_event(
            lambda e: e["type"] == "reg" and e["generation"] == generation,
            timeout,
            start=mark,
            what="a REGISTER final response",
        )
        self.last_registration = event
        return int(event["code"])

    # -- calls ----------------------------------------------------------------

    def call(self, target_uri: str) -> None:
        """Send INVITE to target_uri (through the outbound proxy once registered)."""
        reply = self._request({"cmd": "call", "uri": target_uri})
        self._current_call = int(reply["handle"])

    def wait_incoming(self, timeout: float = DEFAULT_TIMEOUT) -> Event:
        """Wait for an INVITE not seen before; it becomes the current call.

        Returns ``handle``, ``remote_uri``, ``local_uri``, ``call_id``, ``src`` (the
        sender's "ip:port") and ``msg`` (the whole INVITE as received).
        """
        event = self._wait_event(
            lambda e: e["type"] == "incoming" and e["handle"] not in self._taken_incoming,
            timeout,
            what="an incoming call",
        )
        self._taken_incoming.add(int(event["handle"]))
        self._current_call = int(event["handle"])
        return event

    def answer(self, code: int = 200, *, handle: int | None = None) -> None:
        """Answer the current incoming call with `code` (180, 200, 486, 603, ...)."""
        self._request({"cmd": "answer", "handle": self._handle(handle), "code": code})

    def hangup(self, code: int | None = None, *, handle: int | None = None) -> None:
        """BYE, CANCEL or reject (with `code`, default 603) depending on the call state."""
        self._request({"cmd": "hangup", "handle": self._handle(handle), "code": code})

    def reinvite(self, timeout: float = DEFAULT_TIMEOUT, *, handle: int | None = None) -> int:
        """Send a re-INVITE in the call (same media); return its final status code."""
        h = self._handle(handle)
        with self._cond:
            mark = len(self._events)
        self._request({"cmd": "reinvite", "handle": h})
        event = self._wait_event(
            lambda e: e["type"] == "tsx" and e["handle"] == h and e["method"] == "INVITE",
            timeout,
            start=mark,
            what="the re-INVITE's final response",
        )
        return int(event["code"])

    def wait_state(
        self, state: str, timeout: float = DEFAULT_TIMEOUT, *, handle: int | None = None
    ) -> Event:
        """Wait until the call has reached pjsua2 state `state` (at any time so far).

        States: CALLING, INCOMING, EARLY, CONNECTING, CONFIRMED, DISCONNECTED.
        Returns the call_state event: ``state``, ``code`` and ``reason`` (the last SIP
        status seen, e.g. 486 on a DISCONNECTED busy call), ``call_id``, URIs.
        Raises PhoneError at once if the call ended without reaching `state`.
        """
        state = state.upper()
        call = self._handle(handle)

        def match(e: Event) -> bool:
            if e["type"] != "call_state" or e["handle"] != call:
                return False
            if e["state"] == "DISCONNECTED" and state != "DISCONNECTED":
                raise PhoneError(
                    self._describe(
                        f"call ended ({e['code']} {e['reason']}) before reaching {state}"
                    )
                )
            return bool(e["state"] == state)

        return self._wait_event(match, timeout, what=f"call state {state}")

    def call_states(self, *, handle: int | None = None) -> list[Event]:
        """Every call_state event of the call so far, oldest first."""
        call = self._handle(handle)
        return [e for e in self._snapshot() if e["type"] == "call_state" and e["handle"] == call]

    def log_tail(self) -> str:
        """The last lines the agent wrote to stderr (pjsua2's log)."""
        with self._cond:
            return "\n".join(self._log)

    # -- lifecycle ------------------------------------------------------------

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Destroy the pjsua2 library (hanging up calls) and reap the child."""
        close_all([self], timeout)

    def _ask_to_quit(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._proc.poll() is None:
            try:
                self._send({"id": 0, "cmd": "quit"})
                assert self._proc.stdin is not None
                self._proc.stdin.close()  # EOF also makes the agent quit
            except OSError:
                pass

    def _reap(self, timeout: float) -> None:
        proc = self._proc
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=timeout)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    # -- plumbing -------------------------------------------------------------

    def _handle(self, handle: int | None) -> int:
        if handle is not None:
            return handle
        if self._current_call is None:
            raise PhoneError(f"{self!r} has no current call")
        return self._current_call

    def _snapshot(self) -> list[Event]:
        with self._cond:
            return list(self._events)

    def _send(self, msg: dict[str, Any]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(json.dumps(msg) + "\n")
        stdin.flush()

    def _request(self, msg: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> Event:
        if self._closed:
            raise PhoneError(f"{self!r} is closed")
        with self._cond:
            cmd_id = self._next_id
            self._next_id += 1
            mark = len(self._events)
        try:
            self._send({**msg, "id": cmd_id})
        except OSError as exc:
            raise PhoneError(self._describe(f"cannot send {msg['cmd']!r}: {exc}")) from exc
        reply = self._wait_event(
            lambda e: e["type"] == "reply" and e["id"] == cmd_id,
            timeout,
            start=mark,
            what=f"reply to {msg['cmd']!r}",
        )
        if not reply["ok"]:
            raise PhoneError(self._describe(f"{msg['cmd']!r} failed: {reply['error']}"))
        return reply

    def _wait_event(
        self,
        match: Callable[[Event], bool],
        timeout: float,
        *,
        start: int = 0,
        what: str = "an event",
    ) -> Event:
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self._events):
                    event = self._events[index]
                    index += 1
                    if match(event):
                        return event
                if self._stdout_done:
                    raise PhoneError(self._describe(f"agent exited while waiting for {what}"))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PhoneTimeout(self._describe(f"no {what} within {timeout}s"))
                self._cond.wait(remaining)

    def _describe(self, problem: str) -> str:
        return f"{self!r}: {problem}\n--- agent log tail ---\n{self.log_tail()}"

    def _read_stdout(self) -> None:
        stdout: IO[str] | None = self._proc.stdout
        assert stdout is not None
        for line in stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            with self._cond:
                if isinstance(event, dict) and "type" in event:
                    self._events.append(event)
                else:
                    self._log.append(f"[stdout] {line.rstrip()}")
                self._cond.notify_all()
        with self._cond:
            self._stdout_done = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        stderr: IO[str] | None = self._proc.stderr
        assert stderr is not None
        for line in stderr:
            with self._cond:
                self._log.append(line.rstrip())


def close_all(phones: list[Phone], timeout: float = CLOSE_TIMEOUT) -> None:
    """Close phones concurrently: all are told to quit before any is waited for."""
    for phone in phones:
        phone._ask_to_quit()
    for phone in phones:
        phone._reap(timeout)


@pytest.fixture
def phone_factory() -> Iterator[PhoneFactory]:
    """Create phones with ``phone_factory(name, transport=..., ...)``; all closed at teardown."""
    phones: list[Phone] = []

    def make(
        name: str, transport: Transport = "udp", bind_ip: str = "127.0.0.1", **kw: Any
    ) -> Phone:
        phone = Phone(name, transport=transport, bind_ip=bind_ip, **kw)
        phones.append(phone)
        return phone

    yield make
    close_all(phones)

"""Network namespaces for partition tests: sites on a switch whose ports can be unplugged.

:class:`Lab` builds a star: a ``hub`` namespace holding a Linux bridge, and one namespace
per site, joined to the bridge by a veth pair (``eth0`` in the site, ``v-NAME`` on the
hub). Cutting a site off sets its hub-side port down: the site keeps its own address and
loopback (its phones, proxy, DHT node and Redis still talk to each other) but no
datagram leaves or reaches it, exactly as when its uplink fails. Healing sets it up again.

Every interface is created inside the lab's namespaces, so nothing is added to the host's
own network, and deleting the namespaces deletes the links. Namespace names carry the
test process's pid (``p2pp<pid>-...``): :func:`remove_leftovers` deletes those of runs
whose process is gone (a run killed before its teardown). Needs root and iproute2.

Processes go into a namespace with ``ip netns exec`` (:attr:`Netns.prefix`); quick
checks from the test process itself (is the DHT node up? does the proxy answer
OPTIONS?) run in a short-lived thread that joined the namespace (:meth:`Netns.call`),
and in-process DHT nodes run on an event loop in a thread that did (:class:`NetnsLoop`):
setns(2) switches only the calling thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "p2pp"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")
SUBNET = "10.99.0"  # the lab's own addresses; they exist only inside its namespaces

T = TypeVar("T")


class NetnsError(RuntimeError):
    """An ``ip`` command failed, or a thread could not join a namespace."""


def ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be used here (a skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 is not installed (apt-get install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "br0", "type", "bridge")
        ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except NetnsError as exc:
        return f"ip netns, bridges or veths do not work here: {exc}"
    finally:
        with contextlib.suppress(NetnsError):
            ip("netns", "delete", probe)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_members(name: str) -> None:
    """SIGKILL what still runs in namespace ``name`` (only ever one of ours)."""
    with contextlib.suppress(NetnsError):
        for pid in ip("netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def remove_leftovers() -> list[str]:
    """Delete the namespaces of earlier runs whose test process has exited."""
    removed = []
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        if _pid_alive(int(match.group(1))):
            continue  # another run, still going
        _kill_members(name)
        with contextlib.suppress(NetnsError):
            ip("netns", "delete", name)
        removed.append(name)
    return removed


def _enter(name: str) -> None:
    """Move the calling thread (only) into namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(_NETNS_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise NetnsError(f"setns {name}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


class Netns:
    """One namespace of the lab, by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def prefix(self) -> list[str]:
        """Put this in front of a command to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str) -> str:
        return ip("-n", self.name, *args)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """``fn()`` in a fresh thread inside the namespace; its sockets live there."""
        result: list[T] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                _enter(self.name)
                result.append(fn())
            except BaseException as exc:  # handed to the caller's thread
                error.append(exc)

        thread = threading.Thread(target=run, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise NetnsError(f"{fn!r} in {self.name} did not return within {timeout}s")
        if error:
            raise error[0]
        return result[0]


class NetnsLoop:
    """An asyncio event loop on a thread inside a namespace; :meth:`run` submits to it."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.loop = asyncio.new_event_loop()
        entered: list[BaseException | None] = []
        ready = threading.Event()

        def serve() -> None:
            try:
                _enter(ns.name)
                entered.append(None)
            except BaseException as exc:
                entered.append(exc)
            ready.set()
            if entered[0] is None:
                asyncio.set_event_loop(self.loop)
                self.loop.run_forever()

        self._thread = threading.Thread(target=serve, name=f"loop-{ns.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if not entered or entered[0] is not None:
            self.loop.close()
            raise NetnsError(f"no event loop in {ns.name}: {entered[0] if entered else 'hung'}")

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        """Cancel what still runs on the loop, stop it and end its thread."""
        if self.loop.is_closed():
            return

        async def cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class Lab:
    """A hub with a bridge and one namespace per site, each with one address on it."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.hub = Netns(f"{self.tag}-hub")
        self.sites: dict[str, Netns] = {}
        self.hosts: dict[str, str] = {}
        self._all: list[Netns] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, ns: Netns) -> Netns:
        ip("netns", "add", ns.name)
        self._all.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def build(self, names: list[str]) -> Lab:
        """The hub and a site namespace per name, at 10.99.0.1, .2, ... in order."""
        self._add(self.hub)
        self.hub.ip("link", "add", "br0", "type", "bridge")
        self.hub.ip("link", "set", "br0", "up")
        for i, name in enumerate(names, start=1):
            ns = self._add(Netns(f"{self.tag}-{name}"))
            port = self.port(name)
            # Both ends are made inside the lab: the host's namespace never sees them.
            self.hub.ip(
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns.name
            )
            self.hub.ip("link", "set", port, "master", "br0")
            self.hub.ip("link", "set", port, "up")
            host = f"{SUBNET}.{i}"
            ns.ip("addr", "add", f"{host}/24", "dev", "eth0")
            ns.ip("link", "set", "eth0", "up")
            self.sites[name] = ns
            self.hosts[name] = host
        return self

    @staticmethod
    def port(name: str) -> str:
        return f"v-{name}"

    def cut(self, name: str) -> None:
        """Unplug the site from the hub: nothing goes in or out of it any more."""
        self.hub.ip("link", "set", self.port(name), "down")

    def heal(self, name: str) -> None:
        """Plug the site back in (no STP on the bridge: it forwards at once).

        Datagrams sent across while the link was down wait in the kernel for address
        resolution (ARP) for a few seconds and would go out once it is back: flush them
        first, so that what was sent during the outage is lost, as in a long one.
        """
        for ns in self.sites.values():
            ns.ip("neigh", "flush", "dev", "eth0")
        self.hub.ip("link", "set", self.port(name), "up")

    def close(self) -> None:
        """Kill anything left running in the lab, then delete every namespace."""
        for ns in reversed(self._all):
            _kill_members(ns.name)
            with contextlib.suppress(NetnsError):
                ip("netns", "delete", ns.name)
        self._all.clear()


class NetnsRedis:
    """A redis-server inside a site's namespace, on that namespace's own loopback.

    The namespace is private to the lab, so the default port cannot collide with
    anything; the server keeps nothing on disk (these tests do not restart Redis).
    """

    PORT = 6379

    def __init__(self, ns: Netns, directory: Path) -> None:
        self.ns = ns
        self.dir = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.PORT}/0"

    def start(self, timeout: float = 10.0) -> NetnsRedis:
        executable = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.dir.mkdir(parents=True, exist_ok=True)
        command = [
            *self.ns.prefix, executable,
            "--port", str(self.PORT), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        with (self.dir / "redis.stderr").open("ab") as stderr:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NetnsError(f"redis-server in {self.ns.name} exited: {self._log()}")
            if self.ns.call(self._answers_ping):
                return self
            time.sleep(0.05)
        raise NetnsError(f"redis-server in {self.ns.name} did not answer PING: {self._log()}")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.PORT), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@contextlib.contextmanager
def lab(names: list[str]) -> Iterator[Lab]:
    """A built :class:`Lab`, deleted on exit whatever happened inside."""
    remove_leftovers()
    built = Lab()
    try:
        yield built.build(names)
    finally:
        built.close()

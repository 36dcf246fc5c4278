"""``p2psip run --workers N``: a small supervisor and N worker processes.

The supervisor binds every socket the workers serve before it starts them: for each
worker a UDP socket, a TCP and a TLS listener on the site's SIP ports, all with
SO_REUSEPORT, and a private link listener on 127.0.0.1 (:mod:`proxy.siblings`). It keeps
them open, so that a worker that dies and is started again serves the very same
sockets: the kernel's choice of worker for each phone (by source address and port)
never changes, and what arrives for a worker while it restarts waits in its socket.

Then it forks the workers, worker 0 first (it creates what the data directory lacks:
site key, nonce secret, certificates, admin token), the others once worker 0 serves.
Each worker is a site process (:func:`proxy.app.run_site`) with its own event loop;
worker 0 also runs the site's DHT node and the admin API. A worker that exits is
started again (after a delay that grows while it keeps dying young); one that cannot
start at first (exit status 2: the reason is on stderr) stops the site with status 2.
SIGTERM and SIGINT are passed on to every worker, which drains (``shutdown_grace``);
the supervisor exits 0 once all have exited cleanly. SIGHUP is passed on (trust folder).

Forking, not spawning: the supervisor runs no event loop and no thread, so a worker
starts from a clean process without importing anything again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import select
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from types import FrameType

from .app import run_site
from .config import Config, tls_listen_of
from .siblings import LINK_HOST, SECRET_BYTES, WorkerPlan, WorkerSockets
from .site import StartupError
from .transport import shared_listeners, shared_sockets

log = logging.getLogger(__name__)

YOUNG = 10.0  # seconds: a worker that dies sooner is restarted after a growing delay
MAX_DELAY = 10.0  # seconds between restarts of a worker that keeps dying young
KILL_AFTER = 10.0  # seconds past shutdown_grace before workers still running get SIGKILL
PR_SET_PDEATHSIG = 1
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def bind_sockets(config: Config, count: int) -> list[WorkerSockets]:
    """Every worker's sockets; StartupError (one line) if a port cannot be had."""
    listen = config.sip_listen
    tls = tls_listen_of(config)
    opened: list[socket.socket] = []
    try:
        try:
            pairs = shared_sockets(listen.host, listen.port, count)
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        opened += [s for pair in pairs for s in pair]
        try:
            tls_socks = shared_listeners(tls.host, tls.port, count)
        except OSError as exc:
            raise StartupError(f"cannot listen on {tls} (TLS): {exc.strerror or exc}") from None
        opened += tls_socks
        links = []
        for _ in range(count):
            link = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            opened.append(link)
            link.bind((LINK_HOST, 0))
            link.listen(128)
            link.setblocking(False)
            links.append(link)
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return [
        WorkerSockets(udp, tcp, tls_sock, link)
        for (udp, tcp), tls_sock, link in zip(pairs, tls_socks, links, strict=True)
    ]


@dataclass(slots=True)
class _Worker:
    index: int
    pid: int | None = None
    ready_fd: int | None = None  # read end of the pipe the worker writes one byte to
    ready: bool = False
    ever_ready: bool = False
    started: float = 0.0
    young_deaths: int = 0
    restart_at: float | None = None
    status: int = 0  # the last exit status


def run_workers(config: Config) -> int:
    """Supervise ``config.workers`` workers until they stop; the exit status."""
    try:
        sockets = bind_sockets(config, config.workers)
    except StartupError as exc:
        print(f"p2psip: error: {exc}", file=sys.stderr)
        return 2
    try:
        return Supervisor(config, sockets).run()
    finally:
        for ws in sockets:
            for sock in ws.all():
                sock.close()


class Supervisor:
    def __init__(self, config: Config, sockets: list[WorkerSockets]) -> None:
        self.config = config
        self.sockets = sockets
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self.link_ports = tuple(int(ws.link.getsockname()[1]) for ws in sockets)
        self.workers = [_Worker(i) for i in range(len(sockets))]
        self.stopping = False
        self.deadline = 0.0
        self.code = 0
        self._wake_r, self._wake_w = os.pipe()

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        previous = {sig: signal.signal(sig, _no_op) for sig in _SIGNALS}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            port = self.sockets[0].udp.getsockname()[1]
            log.info("starting %d workers on %s port %d", len(self.workers),
                     self.config.sip_listen.host, port)  # fmt: skip
            self._start(self.workers[0])
            while True:
                if self._step():
                    return self.code
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _step(self) -> bool:
        """Wait for a signal, a worker's readiness or a timer; True when all is over."""
        now = time.monotonic()
        waits = [w.restart_at - now for w in self.workers if w.restart_at is not None]
        if self.stopping:
            waits.append(self.deadline - now)
        timeout = max(0.0, min(waits, default=1.0))
        fds = [self._wake_r] + [w.ready_fd for w in self.workers if w.ready_fd is not None]
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select(fds, [], [], timeout)
            for fd in readable:
                if fd == self._wake_r:
                    self._signals()
                else:
                    self._readiness(fd)
        self._reap()
        now = time.monotonic()
        if self.stopping:
            alive = [w for w in self.workers if w.pid is not None]
            if not alive:
                log.info("all workers stopped")
                return True
            if now >= self.deadline:
                for w in alive:
                    log.warning("worker %d (pid %d) still running: killing it", w.index, w.pid)
                    self._signal(w, signal.SIGKILL)
                self.code = 1
                self.deadline = now + 5.0
            return False
        for w in self.workers:
            if w.restart_at is not None and now >= w.restart_at:
                self._start(w)
        return False

    def _signals(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self._stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                log.info("SIGHUP: passed on to the workers")
                for w in self.workers:
                    if w.ready:
                        self._signal(w, signal.SIGHUP)

    def _stop(self, why: str) -> None:
        log.info("%s: stopping %d workers", why, len(self.workers))
        self.stopping = True
        self.deadline = time.monotonic() + self.config.shutdown_grace + KILL_AFTER
        for w in self.workers:
            w.restart_at = None
            self._signal(w, signal.SIGTERM)

    def _signal(self, w: _Worker, sig: signal.Signals) -> None:
        if w.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, sig)

    def _readiness(self, fd: int) -> None:
        w = next(w for w in self.workers if w.ready_fd == fd)
        try:
            data = os.read(fd, 1)
        except OSError:
            data = b""
        os.close(fd)
        w.ready_fd = None
        if not data:
            return  # it exited before it was ready: _reap tells
        w.ready = w.ever_ready = True
        log.info("worker %d ready (pid %d)", w.index, w.pid)
        if w.index == 0 and not self.stopping:
            # Worker 0 made what the data directory lacked: the others can read it now.
            for other in self.workers[1:]:
                if other.pid is None and other.restart_at is None and not other.ever_ready:
                    self._start(other)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = next((w for w in self.workers if w.pid == pid), None)
            if w is None:
                continue
            self._exited(w, status)

    def _exited(self, w: _Worker, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        w.pid, w.ready, w.status = None, False, code
        if w.ready_fd is not None:
            os.close(w.ready_fd)
            w.ready_fd = None
        if self.stopping:
            log.info("worker %d exited (%s)", w.index, how)
            # Killed by the SIGTERM passed on before its loop could take it: fine too.
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                self.code = 1
            return
        if not w.ever_ready:
            # It never served: a setting or the data directory is wrong, not bad luck.
            log.error("worker %d could not start (%s): stopping the site", w.index, how)
            self._stop("a worker failed to start")
            self.code = 2 if code == 2 else 1
            return
        now = time.monotonic()
        if now - w.started < YOUNG:
            w.young_deaths += 1
        else:
            w.young_deaths = 0
        delay = min(MAX_DELAY, 0.5 * 2 ** (w.young_deaths - 1)) if w.young_deaths else 0.0
        log.warning("worker %d exited (%s): starting it again in %.1f s", w.index, how, delay)
        w.restart_at = now + delay

    # --- starting a worker -------------------------------------------------------------

    def _start(self, w: _Worker) -> None:
        w.restart_at = None
        plan = WorkerPlan(
            w.index, len(self.workers), self.sockets[w.index], self.link_ports, self.secret
        )
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_fd)
                self._child_setup(w.index, parent)
                code = _serve(self.config, plan, write_fd)
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(write_fd)
        w.pid, w.ready_fd, w.ready, w.started = pid, read_fd, False, time.monotonic()
        log.info("worker %d started: pid %d", w.index, pid)

    def _child_setup(self, index: int, parent: int) -> None:
        """In a new worker: the supervisor's signals, pipes and other sockets are not its."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until its loop takes it (trust)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        for w in self.workers:
            if w.ready_fd is not None:
                os.close(w.ready_fd)
        for i, ws in enumerate(self.sockets):
            if i != index:
                for sock in ws.all():
                    sock.close()
        _die_with_parent(parent)
        _log_as_worker(index)


def _serve(config: Config, plan: WorkerPlan, ready_fd: int) -> int:
    """A worker's life: run the site, telling the supervisor once it serves."""

    async def main() -> None:
        ready = asyncio.Event()
        site = asyncio.ensure_future(run_site(config, ready, worker=plan))
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({site, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if ready.is_set():
            os.write(ready_fd, b"r")
        os.close(ready_fd)
        await site

    try:
        asyncio.run(main())
    except StartupError as exc:
        print(f"p2psip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _no_op(signum: int, frame: FrameType | None) -> None:
    """The wake-up pipe carries the signal to the loop."""


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker if the supervisor dies (SIGKILL leaves no one to pass
    the signal on)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _log_as_worker(index: int) -> None:
    """Every log line of this process names the worker."""
    fmt = f"%(asctime)s w{index} %(levelname)s %(name)s: %(message)s"
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(fmt))

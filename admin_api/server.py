"""Serving the admin app with uvicorn inside the site's own event loop.

The site owns SIGINT/SIGTERM (``proxy.app`` stops everything on them), so uvicorn must
not install handlers of its own: it would replace the loop's and swallow the signal.
The listening socket is bound here, not by uvicorn, so that a port in use is an
``OSError`` the caller turns into a one-line start-up error (uvicorn would call
``sys.exit`` inside the loop) and so that port 0 works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class _InLoopServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # uvicorn >= 0.29

    def install_signal_handlers(self) -> None:
        pass  # older uvicorn


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one); raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class AdminServer:
    """``await start()`` binds and serves in the running loop; ``await stop()`` ends it."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> int:
        """Serve; returns the port bound. Raises OSError when the port cannot be bound."""
        sock = bind(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            log_config=None,  # the site's logging, not uvicorn's own handlers
            timeout_graceful_shutdown=2,
        )
        server = _InLoopServer(config)
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        deadline = asyncio.get_running_loop().time() + timeout
        while not server.started:
            if self._task.done():
                sock.close()
                self._task.result()  # re-raise what stopped it
                raise OSError(f"the admin API on {self.host}:{self.port} stopped at start-up")
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise OSError(f"the admin API on {self.host}:{self.port} did not start")
            await asyncio.sleep(0.01)
        log.info("admin API on http://%s:%d", _url_host(self.host), self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish (2 s at most), return."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 5.0)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        finally:
            self._server = None
            self._task = None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

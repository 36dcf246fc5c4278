"""Running a site or a standalone DHT node until SIGINT/SIGTERM (``p2psip run``/``dht``).

SIGHUP reads the trust folder (``--trust``) again at once; it is also watched, and read
again within seconds of any change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

from admin_api.app import create_app
from admin_api.server import AdminServer
from dht_adaptor.keys import TrustStore
from dht_adaptor.node import DhtNode

from .config import Config
from .siblings import WorkerPlan
from .site import Site, StartupError, admin_token, build_site, close_dht, open_dht

__all__ = ["StartupError", "admin_token", "keep_joined", "run_dht", "run_site"]

log = logging.getLogger(__name__)

STATS_INTERVAL = 60.0


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT/SIGTERM; installed first, so a signal during start-up
    still means a clean stop (exit status 0), not death by the default handler. SIGHUP
    during start-up is ignored (the trust folder is being read anyway)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP while starting: ignored")
    return stop


@contextlib.contextmanager
def _reload_trust_on_sighup(trust: TrustStore) -> Iterator[None]:
    """While inside, SIGHUP reloads the trust folder (logging what changed, or why the
    previous trust is kept)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, trust.reload, "SIGHUP")
    except (NotImplementedError, RuntimeError):
        yield  # no signals here (not the main thread): the folder is still watched
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


async def _serve_until(stop: asyncio.Event, ready: asyncio.Event | None) -> None:
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("stopping")


async def keep_joined(node: DhtNode, config: Config) -> None:
    """Join through the bootstrap nodes, then again every round.

    Not only when every peer is gone: after a long partition each half has evicted the
    other but still knows its own nodes, and would stay split for good. One ping per
    bootstrap address and a lookup of our own id every 30 s merge the halves again
    (tests/test_partition.py). Before the first answer (the bootstrap node may start
    after us, as in docker-compose) it tries every 2 s.
    """
    addrs = [(b.host, b.port) for b in config.bootstrap]
    joined = False
    while True:
        peers = await node.bootstrap(addrs)
        if peers and not joined:
            log.info("joined the overlay: %d peer(s) known", peers)
        elif not peers:
            log.warning("no DHT node answers (bootstrap %s)", ", ".join(map(str, config.bootstrap)))
        joined = peers > 0
        await asyncio.sleep(2.0 if not joined else 30.0)


Job = Callable[[], Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def _background(*jobs: Job) -> AsyncIterator[None]:
    """Run coroutines (made by ``jobs``) while inside; cancel them on the way out."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(job()) for job in jobs]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _joining(node: DhtNode, config: Config) -> list[Job]:
    return [lambda: keep_joined(node, config)] if config.bootstrap else []


async def run_dht(config: Config, ready: asyncio.Event | None = None) -> None:
    """``p2psip dht``: a standalone node that stores and serves records, nothing else."""
    stop = _stop_on_signals()
    node, _key = await open_dht(config)
    try:
        with _reload_trust_on_sighup(node.trust):
            async with _background(*_joining(node, config)):
                await _serve_until(stop, ready)
    finally:
        await close_dht(node)


async def _log_stats_every(interval: float, site: Site) -> None:
    while True:
        await asyncio.sleep(interval)
        log.info("stats: %s", json.dumps(site.stats(), sort_keys=True))


async def run_site(
    config: Config, ready: asyncio.Event | None = None, *, worker: WorkerPlan | None = None
) -> None:
    """``p2psip run`` with one process, or one worker process of several (``worker``,
    proxy.workers: only worker 0 serves the admin API and runs the DHT node)."""
    stop = _stop_on_signals()
    site = await build_site(config, worker=worker)
    site.server.transport.guard_resources()  # fd limit up; EMFILE logged once per interval
    admin: AdminServer | None = None
    try:
        await site.start()
        listen = config.admin_listen
        if site.services is not None:
            admin = AdminServer(create_app(site.services), listen.host, listen.port)
            try:
                await admin.start()
            except OSError as exc:
                admin = None
                reason = exc.strerror or exc
                raise StartupError(f"cannot listen on {listen} (admin API): {reason}") from None
        jobs: list[Job] = [lambda: _log_stats_every(STATS_INTERVAL, site)]
        if site.node is not None:
            jobs += _joining(site.node, config)
        try:
            with _reload_trust_on_sighup(site.trust):
                async with _background(*jobs):
                    await _serve_until(stop, ready)
                    await site.drain(config.shutdown_grace)
        finally:
            log.info("stats: %s", json.dumps(site.stats(), sort_keys=True))
    finally:
        if admin is not None:
            await admin.stop()  # first: no admin request may reach a closed part
        await site.close()

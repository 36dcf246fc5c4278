"""Building and running one site from a Config: store, users, auth and the SIP server."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from pathlib import Path

from dht_adaptor.location import LocationError, LocationStore, MemoryStore

from .config import Config
from .server import SipServer

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The site cannot start; the message is one line for the operator."""


def nonce_secret(data_dir: Path) -> bytes:
    """A per-site secret for digest nonces, kept so that restarts accept fresh nonces."""
    path = data_dir / "nonce.secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    secret = secrets.token_bytes(32)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex())
    except OSError as exc:
        log.warning("cannot keep the nonce secret in %s (%s); using a fresh one", path, exc)
    return secret


async def open_store(config: Config) -> LocationStore:
    if not config.redis_url:
        return MemoryStore()
    from dht_adaptor.redis_store import RedisStore

    try:
        store = RedisStore(config.redis_url)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    # Redis may still be starting (docker-compose): wait a little before giving up.
    for attempt in range(20):
        try:
            await store.ping()
            return store
        except LocationError as exc:
            if attempt == 19:
                await store.close()
                raise StartupError(f"cannot reach Redis: {exc}") from None
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


def build_auth(config: Config, server: SipServer) -> None:
    if config.users_file is None:
        log.warning("no users file: registration is open to anyone (use --users FILE)")
        return
    from .auth_gate import AuthGate
    from .users import UsersFileError, load_users_file

    realm = config.domains[0] if config.domains else "p2psip"
    try:
        users = load_users_file(config.users_file, realm)
    except UsersFileError as exc:
        raise StartupError(str(exc)) from None
    server.registrar.users = users
    server.proxy.auth = AuthGate(server, users, realm, nonce_secret(config.data_dir))
    log.info("digest authentication on for %d user(s), realm %r", len(users), realm)


async def run_site(config: Config, ready: asyncio.Event | None = None) -> None:
    store = await open_store(config)
    server = SipServer(config, store)
    try:
        build_auth(config, server)
        try:
            await server.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.sip_listen}: {exc.strerror or exc}") from None
        if not config.domains:
            log.warning("no --domain given: serving every domain name")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping")
    finally:
        await server.close()
        await store.close()

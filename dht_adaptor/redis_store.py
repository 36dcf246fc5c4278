"""A :class:`~dht_adaptor.location.LocationStore` kept in Redis, so bindings survive restarts
and several proxy processes on one site share them.

Layout: one string key per AOR, ``{prefix}aor:{aor}``, holding the AOR's bindings encoded
by :mod:`dht_adaptor.codec`. ``save`` rewrites the key with one ``SET ... PXAT`` (atomic,
and idempotent, so a retry after a dropped connection is harmless); the key's absolute
expiry is the latest binding's ``expires_at``, so an AOR nobody refreshes vanishes on its
own. Within the key, bindings that expired earlier are filtered out by ``load`` using the
caller's ``now``. The expiry is wall-clock time, so the proxy and Redis hosts need sane
clocks (NTP); skew only moves the moment the key is dropped, never what ``load`` returns
before that.

A marker key, ``{prefix}marker:bindings``, holds a random token that only a loss of data
removes (FLUSHALL, FLUSHDB, a restart without persistence, eviction under ``maxmemory``):
:class:`~dht_adaptor.cached_store.CachedStore` reads it to notice that Redis forgot what
it was told, and writes back what it holds with :meth:`RedisStore.restore`, which never
overwrites an AOR someone saved since.

Every failure (refused, timeout, unreadable record) is raised as
:class:`~dht_adaptor.location.LocationError`; the proxy answers 5xx. Messages name the
server as ``host:port/db`` and never include the URL's credentials.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from dht_adaptor.codec import CodecError, decode_bindings, encode_bindings
from proxy.location import Binding, LocationError
from proxy.redis_support import describe_url, glob_escape, redis_errors

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "p2psip:"
DEFAULT_TIMEOUT = 2.0  # seconds, for connecting and for each command
_SCAN_COUNT = 500


class RedisStore:
    """Bindings in Redis, one key per AOR (see the module docstring)."""

    def __init__(
        self, url: str, prefix: str = DEFAULT_PREFIX, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """Check ``url`` now (``ValueError``); nothing connects until the first command."""
        self._where = describe_url(url)  # raises ValueError for a bad URL
        if not timeout > 0:
            raise ValueError(f"redis timeout must be positive, got {timeout}")
        self._prefix = prefix
        self._key_prefix = f"{prefix}aor:"
        self._marker_key = f"{prefix}marker:bindings"
        try:
            self._client = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # Retry once, at once, when a pooled connection turns out dead (Redis
                # restarted). Timeouts are not retried: a stuck server costs one timeout.
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        except ValueError as exc:  # e.g. a bad query argument; the message has no secrets
            raise ValueError(f"invalid redis URL for {self._where}: {exc}") from None

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix={self._prefix!r})"

    @property
    def where(self) -> str:
        """The server as ``host:port/db`` (no credentials), for messages."""
        return f"redis at {self._where}"

    def key(self, aor: str) -> str:
        """The Redis key holding the bindings of ``aor``."""
        return f"{self._key_prefix}{aor}"

    async def load(self, aor: str, now: float) -> list[Binding]:
        key = self.key(aor)
        with self._errors(f"load {aor!r}"):
            data = await self._client.get(key)
        if data is None:
            return []
        if isinstance(data, str):  # typed bytes | str; only bytes while decode_responses is off
            data = data.encode("utf-8")
        try:
            bindings = decode_bindings(data)
        except CodecError as exc:
            raise LocationError(
                f"redis at {self._where}: unreadable record in key {key!r}: {exc}"
            ) from exc
        return [b for b in bindings if b.is_live(now)]

    async def save(self, aor: str, bindings: Sequence[Binding], now: float) -> None:
        key = self.key(aor)
        live = [b for b in bindings if b.is_live(now)]
        if not live:
            with self._errors(f"delete {aor!r}"):
                await self._client.delete(key)
            return
        data, expire_at_ms = _encoded(aor, live)
        with self._errors(f"save {aor!r}"):
            await self._client.set(key, data, pxat=expire_at_ms)

    async def restore(self, aor: str, bindings: Sequence[Binding], now: float) -> bool:
        """Write the live ``bindings`` of ``aor`` unless Redis holds the AOR already (SET NX:
        a REGISTER saved since the loss wins). True if they were written."""
        live = [b for b in bindings if b.is_live(now)]
        if not live:
            return False
        data, expire_at_ms = _encoded(aor, live)
        with self._errors(f"restore {aor!r}"):
            return bool(await self._client.set(self.key(aor), data, pxat=expire_at_ms, nx=True))

    async def marker(self) -> str | None:
        """The marker's token, or None if Redis lost it (see the module docstring)."""
        with self._errors("read the marker"):
            value = await self._client.get(self._marker_key)
        return None if value is None else _text(value)

    async def ensure_marker(self) -> str:
        """Set a new marker unless there is one (several processes may race: one wins);
        return the token in force."""
        with self._errors("write the marker"):
            await self._client.set(self._marker_key, secrets.token_hex(8), nx=True)
            value = await self._client.get(self._marker_key)
        if value is None:  # lost again in between: the next check writes it once more
            raise LocationError(f"redis at {self._where}: the marker vanished as it was written")
        return _text(value)

    async def aors(self) -> AsyncIterator[str]:
        # SCAN may return a key more than once (while Redis rehashes): yield each once.
        pattern = glob_escape(self._key_prefix) + "*"
        seen: set[str] = set()
        cursor = 0
        while True:
            with self._errors("scan AORs"):
                cursor, keys = await self._client.scan(cursor, match=pattern, count=_SCAN_COUNT)
            for raw in keys:
                try:
                    key = raw if isinstance(raw, str) else raw.decode("utf-8")
                except UnicodeDecodeError:
                    log.warning("skipping non-UTF-8 key %r at %s", raw, self._where)
                    continue
                aor = key[len(self._key_prefix) :]
                if aor not in seen:
                    seen.add(aor)
                    yield aor
            if cursor == 0:
                return

    async def ping(self) -> None:
        """Readiness check: return if Redis answers, else raise ``LocationError``."""
        with self._errors("ping"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return redis_errors(LocationError, self._where, action)


def _encoded(aor: str, live: Sequence[Binding]) -> tuple[bytes, int]:
    """The record of ``live`` (not empty) and the key's expiry in Unix milliseconds."""
    try:
        data = encode_bindings(live)
    except CodecError as exc:
        raise LocationError(f"cannot store bindings of {aor!r}: {exc}") from exc
    # Round up, so the key never disappears before its latest binding has expired.
    return data, math.ceil(max(b.expires_at for b in live) * 1000)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

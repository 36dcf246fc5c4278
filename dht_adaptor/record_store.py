"""What one DHT node holds: the merged, verified bindings per DHT key.

kademlia's own storage keeps one opaque value per key, and the last write wins, so two
sites registering the same AOR overwrite each other. A :class:`RecordStore` instead
*merges* every record it is sent into what it already holds (:func:`record.merge`: per
binding identity the highest version wins, expired bindings drop out). Merging is
commutative and idempotent, which is what makes replication, republishing and read repair
safe: sending a record twice, late, or to the wrong node can never lose a binding.

Records arrive from the network, so they are untrusted bytes. ``merge_in`` keeps only the
bindings that

* decode (:func:`record.decode_record`; an unreadable record is rejected as a whole),
* belong under the key they were sent for (``dht_key(binding.aor) == key``; otherwise a
  site could plant bindings of one user under another user's key), and
* carry a valid signature by a site key in the :class:`~dht_adaptor.keys.TrustStore`.

Each dropped binding (and each unreadable record) adds one to ``rejected``. A binding
outside its key's scope counts as unverified.

Trust changes while records are held (a site's key removed or its scope narrowed): ``get``
and ``items`` return only the held bindings whose key is still trusted for their AOR, so
they are neither served nor republished; their bytes stay until they expire.

Time is passed in (``now``, wall-clock seconds, like ``expires_at``), never read here.
Expired bindings are forgotten without anyone deleting them: lazily on every read, by
:meth:`MemoryRecordStore.sweep`, and in Redis by giving each key an absolute expiry
(``PEXPIREAT``) equal to the latest ``expires_at`` it holds.

This module does not import kademlia: keys are the 20-byte SHA-1 digests kademlia uses,
passed in as bytes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from dht_adaptor.keys import TrustStore
from dht_adaptor.record import (
    DhtBinding,
    RecordError,
    decode_record,
    dht_key,
    encode_record,
    merge,
)
from proxy.redis_support import describe_url, glob_escape, redis_errors

log = logging.getLogger(__name__)

KEY_BYTES = 20  # kademlia keys are SHA-1 digests
# A held record merges every site's bindings of one AOR, so it may outgrow what one store
# RPC carries (MAX_RECORD_BYTES); it is replicated in chunks (see node.py). This cap (and
# record.MAX_BINDINGS) keeps it within one UDP datagram of a find_value answer (65,507
# bytes minus the RPC framing). Incoming store RPCs are held to record.WIRE_LIMIT.
MAX_HELD_BYTES = 60_000
DEFAULT_REDIS_PREFIX = "p2psip:dht:"
DEFAULT_REDIS_TIMEOUT = 2.0  # seconds, for connecting and for each command
_WATCH_RETRIES = 8  # optimistic-transaction retries when another process wrote the key
_SCAN_COUNT = 500

Bindings = tuple[DhtBinding, ...]


class RecordStoreError(Exception):
    """The store could not be read or written (e.g. Redis is down)."""


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What ``merge_in`` did with one incoming record."""

    accepted: int  # bindings verified and merged (a newer version held may still win)
    rejected: int  # bindings dropped (see the module docstring); 1 for an unreadable record
    held: int  # bindings held under the key afterwards, tombstones included

    @property
    def ok(self) -> bool:
        """True if the whole record was taken: what ``rpc_store`` answers."""
        return self.rejected == 0


class RecordStore(Protocol):
    """The bindings one DHT node holds, merged per key (see the module docstring)."""

    @property
    def accepted(self) -> int:
        """Bindings accepted by ``merge_in`` since the store was made."""
        ...

    @property
    def rejected(self) -> int:
        """Bindings (and unreadable records) rejected by ``merge_in``."""
        ...

    async def merge_in(self, key: bytes, value: bytes, now: float) -> MergeResult:
        """Decode, verify and merge an untrusted record into what is held under ``key``."""
        ...

    async def merge_bindings(self, key: bytes, bindings: Bindings, now: float) -> MergeResult:
        """``merge_in`` for bindings already decoded (a node's own put: no trip through
        the wire format). Each is still verified and must belong under ``key``."""
        ...

    async def get(self, key: bytes, now: float) -> Bindings:
        """The merged unexpired bindings under ``key`` whose key is still trusted for their
        AOR, tombstones included; () if none."""
        ...

    def items(self, now: float) -> AsyncIterator[tuple[bytes, Bindings]]:
        """Every key with unexpired bindings, for republishing and replication."""
        ...

    async def count(self) -> int:
        """How many keys are held (some may hold only bindings that just expired)."""
        ...

    async def sweep(self, now: float) -> int:
        """Forget expired bindings now; returns how many were dropped (if known)."""
        ...

    async def close(self) -> None: ...


class _KeyLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[bytes, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: bytes) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _MergingStore:
    """The ``merge_in`` logic; subclasses say how to read-modify-write one key."""

    def __init__(self, trust: TrustStore) -> None:
        self._trust = trust
        self._locks = _KeyLocks()
        self._accepted = 0
        self._rejected = 0

    @property
    def accepted(self) -> int:
        return self._accepted

    @property
    def rejected(self) -> int:
        return self._rejected

    async def merge_in(self, key: bytes, value: bytes, now: float) -> MergeResult:
        incoming = self._readable(key, value)
        if incoming is None:
            self._rejected += 1
            return MergeResult(accepted=0, rejected=1, held=len(await self.get(key, now)))
        return await self._merge(key, *incoming, now)

    async def merge_bindings(self, key: bytes, bindings: Bindings, now: float) -> MergeResult:
        own = tuple(b for b in bindings if dht_key(b.aor) == key)
        return await self._merge(key, own, len(bindings) - len(own), now)

    async def _merge(self, key: bytes, own: Bindings, misplaced: int, now: float) -> MergeResult:
        trust = self._trust
        counts = (0, 0)  # (accepted, rejected) by the last call of combine

        def combine(held: Bindings) -> Bindings | None:
            # Bindings identical to held ones (a replica sent again, as replication to a
            # new contact does) were verified when they were stored: only new ones are
            # checked, and nothing is written when nothing is new.
            nonlocal counts
            known = set(held)
            again = [b for b in own if b in known]
            fresh, untrusted = trust.filter(b for b in own if b not in known)
            still = sum(1 for b in again if trust.allows(b.key_id, b.aor))
            counts = (len(fresh) + still, misplaced + untrusted + len(again) - still)
            if not fresh:
                return held  # unchanged: _update writes nothing
            merged = merge(held, fresh, now=now)
            try:
                encode_record(merged, max_bytes=MAX_HELD_BYTES)
            except RecordError:
                return None
            return merged

        async with self._locks.hold(key):
            merged = await self._update(key, combine, now)
        accepted, rejected = counts
        if merged is None:
            # Too many bindings for one AOR: keep what is held rather than drop some.
            log.warning(
                "record for key %s would exceed %d bytes; refused", key.hex(), MAX_HELD_BYTES
            )
            self._rejected += accepted + rejected
            return MergeResult(0, accepted + rejected, held=len(await self.get(key, now)))
        if rejected:
            log.debug("key %s: %d binding(s) misplaced or unverified", key.hex(), rejected)
        self._accepted += accepted
        self._rejected += rejected
        return MergeResult(accepted=accepted, rejected=rejected, held=len(merged))

    def _readable(self, key: bytes, value: bytes) -> tuple[Bindings, int] | None:
        """(the bindings filed under ``key``, how many were under another key), or None
        for an unreadable record."""
        if not isinstance(key, bytes) or len(key) != KEY_BYTES or not isinstance(value, bytes):
            log.debug("record refused: key or value is not bytes of the right size")
            return None
        try:
            bindings = decode_record(value)
        except RecordError as exc:
            log.debug("unreadable record for key %s: %s", key.hex(), exc)
            return None
        own = tuple(b for b in bindings if dht_key(b.aor) == key)
        return own, len(bindings) - len(own)

    async def _update(
        self, key: bytes, combine: Callable[[Bindings], Bindings | None], now: float
    ) -> Bindings | None:
        """Replace the held bindings by ``combine(held)`` (unless it returns None)."""
        raise NotImplementedError

    async def get(self, key: bytes, now: float) -> Bindings:
        held = await self._held_bindings(key, now)
        allows = self._trust.allows
        trusted = tuple(b for b in held if allows(b.key_id, b.aor))
        return held if len(trusted) == len(held) else trusted

    async def _held_bindings(self, key: bytes, now: float) -> Bindings:
        """The merged unexpired bindings held under ``key``, whoever signed them."""
        raise NotImplementedError


class MemoryRecordStore(_MergingStore):
    """Records in a dict, lost when the process stops."""

    def __init__(self, trust: TrustStore) -> None:
        super().__init__(trust)
        self._held: dict[bytes, Bindings] = {}
        # key -> when its first binding expires: a sweep merges only the keys due, so an
        # idle node's work does not grow with the records it holds.
        self._due: dict[bytes, float] = {}

    def __repr__(self) -> str:
        return f"MemoryRecordStore(keys={len(self._held)})"

    async def _update(
        self, key: bytes, combine: Callable[[Bindings], Bindings | None], now: float
    ) -> Bindings | None:
        held = self._held.get(key, ())
        merged = combine(held)
        if merged is not None and merged is not held:
            self._set(key, merged)
        return merged

    def _set(self, key: bytes, bindings: Bindings) -> None:
        if bindings:
            self._held[key] = bindings
            self._due[key] = min(b.expires_at for b in bindings)
        else:
            self._held.pop(key, None)
            self._due.pop(key, None)

    async def _held_bindings(self, key: bytes, now: float) -> Bindings:
        held = self._held.get(key)
        if held is None:
            return ()
        current = merge(held, now=now)
        if len(current) != len(held):  # some expired: forget them (lazy expiry)
            self._set(key, current)
        return current

    async def items(self, now: float) -> AsyncIterator[tuple[bytes, Bindings]]:
        for key in list(self._held):
            bindings = await self.get(key, now)
            if bindings:
                yield key, bindings

    async def count(self) -> int:
        return len(self._held)

    async def sweep(self, now: float) -> int:
        dropped = 0
        for key in [key for key, due in self._due.items() if not due > now]:
            held = self._held[key]
            current = merge(held, now=now)
            if len(current) != len(held):
                dropped += len(held) - len(current)
                self._set(key, current)
        return dropped

    async def close(self) -> None:
        self._held.clear()
        self._due.clear()


class RedisRecordStore(_MergingStore):
    """Records in Redis, one string key per DHT key: ``{prefix}{key.hex()}``.

    The value is the merged record (``encode_record``). Each write sets the key's absolute
    expiry to the latest ``expires_at`` it holds, so Redis drops a record nobody refreshes;
    bindings that expired earlier are filtered on read and dropped on the next write. The
    expiry is wall-clock time: keep the clocks of DHT hosts and Redis in sync (NTP).

    Writes are optimistic transactions (WATCH/MULTI), so even two processes sharing one
    prefix by mistake cannot lose each other's bindings. Failures raise
    :class:`RecordStoreError`; messages name the server, never the URL's credentials.
    """

    def __init__(
        self,
        url: str,
        trust: TrustStore,
        *,
        prefix: str = DEFAULT_REDIS_PREFIX,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
    ) -> None:
        super().__init__(trust)
        self._where = describe_url(url)  # ValueError for a bad URL
        if not timeout > 0:
            raise ValueError(f"redis timeout must be positive, got {timeout}")
        self._prefix = prefix
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def __repr__(self) -> str:
        return f"RedisRecordStore({self._where!r}, prefix={self._prefix!r})"

    def redis_key(self, key: bytes) -> str:
        return f"{self._prefix}{key.hex()}"

    async def _update(
        self, key: bytes, combine: Callable[[Bindings], Bindings | None], now: float
    ) -> Bindings | None:
        name = self.redis_key(key)
        with self._errors(f"merge into {name}"):
            for _ in range(_WATCH_RETRIES):
                async with self._client.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(name)
                        held = self._decode(name, await pipe.get(name), now)
                        merged = combine(held)
                        if merged is None or merged is held:
                            return merged  # refused, or unchanged: nothing to write
                        pipe.multi()  # type: ignore[no-untyped-call]
                        if merged:
                            data = encode_record(merged, max_bytes=MAX_HELD_BYTES)
                            # Round up: never drop the key before its last binding expired.
                            expire_ms = math.ceil(max(b.expires_at for b in merged) * 1000)
                            pipe.set(name, data, pxat=expire_ms)
                        else:
                            pipe.delete(name)
                        await pipe.execute()
                        return merged
                    except WatchError:
                        continue
            raise RecordStoreError(f"redis at {self._where}: {name} kept changing; gave up")

    async def _held_bindings(self, key: bytes, now: float) -> Bindings:
        name = self.redis_key(key)
        with self._errors(f"get {name}"):
            data = await self._client.get(name)
        return self._decode(name, data, now)

    def _decode(self, name: str, data: bytes | str | None, now: float) -> Bindings:
        if data is None:
            return ()
        if isinstance(data, str):  # only while decode_responses is off; keeps mypy honest
            data = data.encode("utf-8")
        try:
            return merge(decode_record(data, max_bytes=MAX_HELD_BYTES), now=now)
        except RecordError as exc:
            # Only we write these keys; treat a damaged one as empty so it gets rewritten.
            log.warning("redis at %s: unreadable record in %s: %s", self._where, name, exc)
            return ()

    async def _keys(self) -> AsyncIterator[tuple[str, bytes]]:
        pattern = glob_escape(self._prefix) + "*"
        seen: set[str] = set()  # SCAN may return a key twice while Redis rehashes
        cursor = 0
        while True:
            with self._errors("scan"):
                cursor, names = await self._client.scan(cursor, match=pattern, count=_SCAN_COUNT)
            for raw in names:
                name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
                try:
                    key = bytes.fromhex(name[len(self._prefix) :])
                except ValueError:
                    continue
                if len(key) == KEY_BYTES and name not in seen:
                    seen.add(name)
                    yield name, key
            if cursor == 0:
                return

    async def items(self, now: float) -> AsyncIterator[tuple[bytes, Bindings]]:
        async for _, key in self._keys():
            bindings = await self.get(key, now)
            if bindings:
                yield key, bindings

    async def count(self) -> int:
        return len([name async for name, _ in self._keys()])

    async def sweep(self, now: float) -> int:
        return 0  # Redis expires whole keys itself; stale bindings inside drop on write

    async def ping(self) -> None:
        """Readiness check: return if Redis answers, else raise ``RecordStoreError``."""
        with self._errors("ping"):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return redis_errors(RecordStoreError, self._where, action)
